/*
 * Kiln probe guest: virtio-mmio transport (register layout version 2, split virtqueues,
 * polled). Devices come from the virtio_mmio.device= tokens of the kernel command line.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "probe.h"

/* MMIO registers (virtio 1.x, version 2 layout) */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_VENDOR_ID 0x00c
#define VM_DEV_FEATURES 0x010
#define VM_DEV_FEATURES_SEL 0x014
#define VM_DRV_FEATURES 0x020
#define VM_DRV_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS 0x060
#define VM_INT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LO 0x080
#define VM_QUEUE_DESC_HI 0x084
#define VM_QUEUE_DRIVER_LO 0x090
#define VM_QUEUE_DRIVER_HI 0x094
#define VM_QUEUE_DEVICE_LO 0x0a0
#define VM_QUEUE_DEVICE_HI 0x0a4
#define VM_CONFIG_GEN 0x0fc
#define VM_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLK 2

#define ST_ACKNOWLEDGE 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 0x40
#define ST_FAILED 0x80

#define F_VERSION_1 (1UL << 32)

#define VQ_MAX 256		/* queue size used: min(QueueNumMax, VQ_MAX), a power of 2 */
#define VQ_PAGES 3		/* descriptor table, driver area, device area: a page each */

#define VD_NEXT 1
#define VD_WRITE 2

struct vdesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq {
	u32 size;
	u16 avail_idx;		/* next free-running avail index to publish */
	u16 used_idx;		/* used entries consumed so far */
	struct vdesc *desc;
	u64 avail, used;	/* guest-physical = virtual */
};

#define MAX_TX_SLOTS 64

struct vdev {
	u64 base, size;
	u32 irq, devid, version;
	u32 num;		/* index among the devices of its type (blkN, netN) */
	const char *bad;	/* permanent refusal ("legacy", ...) or 0 */
	int ready;		/* initialised and DRIVER_OK */
	u64 offered, feat;	/* device features, negotiated features */
	u64 mem;		/* pool memory (rings, then extra), allocated on first init */
	u64 extra;		/* the device type's own memory inside mem */
	u32 nq;
	struct vq q[2];
	/* blk */
	u64 capacity;
	u32 size_max, seg_max, blk_size;
	/* net */
	u8 mac[6];
	u32 ip;			/* host byte order, 0 = unset */
	u32 nrx, ntx;
	u32 txfree[MAX_TX_SLOTS];
	u32 ntxfree;
	u8 txbusy[MAX_TX_SLOTS];
	u16 ipid;
};

void virtio_discover(void);
/* The `num`-th device with DeviceID `devid`, or 0. */
struct vdev *virtio_find(u32 devid, u32 num);
/* Reset, negotiate `want` (& offered, VERSION_1 required), set up `nq` queues, DRIVER_OK.
 * `extra` bytes of page-aligned memory follow the rings (d->extra). Returns 0 or a reason. */
const char *virtio_init(struct vdev *d, u64 want, u32 nq, u64 extra);
/* Writes 0 to Status and waits for it to read 0. */
void virtio_reset(struct vdev *d);
/* Acknowledges every pending interrupt cause. */
void virtio_ack(struct vdev *d);
u32 virtio_cfg32(struct vdev *d, u32 off);
u8 virtio_cfg8(struct vdev *d, u32 off);
u32 virtio_cfg_gen(struct vdev *d);

/* Publishes a chain head in the avail ring (no notification). */
static inline void vq_add(struct vq *q, u16 head)
{
	barrier();	/* descriptors before the ring entry */
	w16(q->avail + 4 + 2 * (q->avail_idx & (q->size - 1)), head);
	barrier();	/* ring entry before the index */
	q->avail_idx++;
	w16(q->avail + 2, q->avail_idx);
	barrier();
}
static inline void vq_kick(struct vdev *d, u32 qi) { w32(d->base + VM_QUEUE_NOTIFY, qi); }
/* Takes one used element if there is one. */
static inline int vq_get(struct vq *q, u32 *id, u32 *len)
{
	if (r16(q->used + 2) == q->used_idx)
		return 0;
	barrier();	/* the index before the element */
	u64 e = q->used + 4 + 8 * (q->used_idx & (q->size - 1));
	*id = r32(e);
	*len = r32(e + 4);
	q->used_idx++;
	return 1;
}
/* Waits up to `ticks` TSC ticks for a used element: 1 got one, 0 timeout, -1 the device
 * set DEVICE_NEEDS_RESET. */
int vq_wait(struct vdev *d, struct vq *q, u32 *id, u32 *len, u64 ticks);

/* Command arguments: ':'-separated fields. */
#define MAX_ARGS 8
struct args {
	u32 n;
	const char *s[MAX_ARGS];
	u32 l[MAX_ARGS];
};
void split_args(const char *a, u32 len, struct args *out);
int arg_u64(const struct args *a, u32 i, u64 *v);	/* decimal */
int arg_ip(const struct args *a, u32 i, u32 *ip);	/* A.B.C.D */

/* "PROBE-FAIL <cmd> <pfx><num> <reason>" */
void dev_fail(const char *cmd, const char *pfx, u32 num, const char *reason);
/* Finds and (if needed) initialises device `devid` number `num` for command `cmd`; prints
 * the FAIL line and returns 0 if it is absent or unusable. */
struct vdev *dev_get(const char *cmd, const char *pfx, u32 devid, u32 num);
void print_ip(u32 ip);

/* Byte-wise add of two u64 lanes (each byte mod 256, no carries between bytes). */
static inline u64 swar_add(u64 x, u64 y)
{
	return ((x & 0x7f7f7f7f7f7f7f7fUL) + (y & 0x7f7f7f7f7f7f7f7fUL)) ^
	       ((x ^ y) & 0x8080808080808080UL);
}
static inline u64 bcast8(u8 b) { return 0x0101010101010101UL * b; }

/* Device-type init hooks (dev_get calls them): blk.c, net.c. */
const char *blk_setup(struct vdev *d);
const char *net_setup(struct vdev *d);

#endif
