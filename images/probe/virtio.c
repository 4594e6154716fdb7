/*
 * Kiln probe guest: virtio-mmio discovery and transport (version 2 register layout only).
 * Queues are polled; interrupts stay disabled in the CPU, but every interrupt cause the
 * device raises is acknowledged so a level-triggered line does not stay asserted.
 */
#include "virtio.h"

#define MAX_VDEVS 32
static struct vdev vdevs[MAX_VDEVS] NOINIT;	/* each cleared when its token is parsed */
static u32 nvdevs;
static int discovered;

/* Ring and buffer memory for all devices, handed out page by page on first init. */
#define POOL_SIZE (768UL << 10)
static u8 pool[POOL_SIZE] __attribute__((aligned(4096))) NOINIT;
static u64 pool_used;

static u64 pool_alloc(u64 size)
{
	size = (size + 4095) & ~4095UL;
	if (size > POOL_SIZE - pool_used)
		return 0;
	u64 a = (u64)pool + pool_used;
	pool_used += size;
	return a;
}

/* ------------------------------------------------------------------------------------ */
/* Command-line parsing                                                                 */

/* Number with optional 0x prefix (hex) and K/M/G suffix; advances *p. */
static int parse_num(const char **p, const char *end, u64 *v)
{
	const char *s = *p;
	u64 x = 0;
	int any = 0;
	if (s + 1 < end && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (; s < end; s++, any = 1) {
			char c = *s;
			u32 d;
			if (c >= '0' && c <= '9')
				d = (u32)(c - '0');
			else if (c >= 'a' && c <= 'f')
				d = (u32)(c - 'a' + 10);
			else if (c >= 'A' && c <= 'F')
				d = (u32)(c - 'A' + 10);
			else
				break;
			x = x * 16 + d;
		}
	} else {
		for (; s < end && *s >= '0' && *s <= '9'; s++, any = 1)
			x = x * 10 + (u64)(*s - '0');
	}
	if (!any)
		return 0;
	if (s < end && (*s == 'k' || *s == 'K')) {
		x <<= 10;
		s++;
	} else if (s < end && (*s == 'm' || *s == 'M')) {
		x <<= 20;
		s++;
	} else if (s < end && (*s == 'g' || *s == 'G')) {
		x <<= 30;
		s++;
	}
	*p = s;
	*v = x;
	return 1;
}

static const char vm_key[] = "virtio_mmio.device=";

/* Parses one "<size>@<base>:<irq>[:<id>]" value. */
static void add_token(const char *s, const char *end)
{
	u64 size, base, irq = 0;
	if (!parse_num(&s, end, &size) || s >= end || *s != '@')
		return;
	s++;
	if (!parse_num(&s, end, &base))
		return;
	if (s < end && *s == ':') {
		s++;
		parse_num(&s, end, &irq);
	}
	if (nvdevs >= MAX_VDEVS)
		return;
	struct vdev *d = &vdevs[nvdevs++];
	memset(d, 0, sizeof(*d));
	d->base = base;
	d->size = size;
	d->irq = (u32)irq;
}

static void fail_base(struct vdev *d, const char *why)
{
	line_begin();
	ps("PROBE-FAIL virtio-mmio ");
	phex(d->base);
	ser_putc(' ');
	ps(why);
	line_end();
}

void virtio_discover(void)
{
	if (discovered)
		return;
	discovered = 1;
	u32 klen = sizeof(vm_key) - 1;
	for (u32 i = 0; i + klen <= cmdline_len; i++) {
		if (i && cmdline[i - 1] != ' ' && cmdline[i - 1] != '\t')
			continue;
		u32 k = 0;
		while (k < klen && cmdline[i + k] == vm_key[k])
			k++;
		if (k < klen)
			continue;
		u32 e = i + klen;
		while (e < cmdline_len && cmdline[e] != ' ' && cmdline[e] != '\t')
			e++;
		add_token(cmdline + i + klen, cmdline + e);
		i = e;
	}
	u32 nblk = 0, nnet = 0;
	for (u32 i = 0; i < nvdevs; i++) {
		struct vdev *d = &vdevs[i];
		if (d->size < 0x100 || !reachable(d->base, d->size) || (d->base & 3)) {
			d->bad = "unreachable";
			fail_base(d, d->bad);
			continue;
		}
		u32 magic = r32(d->base + VM_MAGIC);
		if (magic != VIRTIO_MAGIC) {
			d->bad = "bad-magic";
			fail_base(d, d->bad);
			continue;
		}
		d->version = r32(d->base + VM_VERSION);
		d->devid = r32(d->base + VM_DEVICE_ID);
		if (d->devid == VIRTIO_ID_BLK)
			d->num = nblk++;
		else if (d->devid == VIRTIO_ID_NET)
			d->num = nnet++;
		if (d->version != 2) {
			d->bad = d->version == 1 ? "legacy" : "bad-version";
			fail_base(d, d->bad);
		}
	}
}

struct vdev *virtio_find(u32 devid, u32 num)
{
	virtio_discover();
	for (u32 i = 0; i < nvdevs; i++) {
		struct vdev *d = &vdevs[i];
		if (d->devid == devid && d->num == num && (!d->bad || d->version))
			return d;
	}
	return 0;
}

void cmd_virtio(void)
{
	virtio_discover();
	for (u32 i = 0; i < nvdevs; i++) {
		struct vdev *d = &vdevs[i];
		line_begin();
		ps("PROBE-VIRTIO base=");
		phex(d->base);
		ps(" size=");
		phex(d->size);
		ps(" irq=");
		pdec(d->irq);
		ps(" version=");
		pdec(d->version);
		ps(" id=");
		pdec(d->devid);
		ps(" name=");
		if (d->devid == VIRTIO_ID_BLK || d->devid == VIRTIO_ID_NET) {
			ps(d->devid == VIRTIO_ID_BLK ? "blk" : "net");
			pdec(d->num);
		} else {
			ser_putc('-');
		}
		if (d->bad) {
			ps(" refused=");
			ps(d->bad);
		}
		line_end();
	}
	line_begin();
	ps("PROBE-OK virtio devices=");
	pdec(nvdevs);
	line_end();
}

/* ------------------------------------------------------------------------------------ */
/* Transport                                                                            */

static u32 rd(struct vdev *d, u32 off) { return r32(d->base + off); }
static void wr(struct vdev *d, u32 off, u32 v) { w32(d->base + off, v); }

void virtio_ack(struct vdev *d)
{
	u32 s = rd(d, VM_INT_STATUS);
	if (s)
		wr(d, VM_INT_ACK, s);
}

u32 virtio_cfg_gen(struct vdev *d) { return rd(d, VM_CONFIG_GEN); }
u32 virtio_cfg32(struct vdev *d, u32 off) { return rd(d, VM_CONFIG + off); }
u8 virtio_cfg8(struct vdev *d, u32 off) { return r8(d->base + VM_CONFIG + off); }

static int reset_wait(struct vdev *d)
{
	wr(d, VM_STATUS, 0);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < WAIT_ITERS; i++) {
		if (rd(d, VM_STATUS) == 0)
			return 1;
		if (rdtsc() - t0 >= WAIT_TICKS)
			break;
		pause();
	}
	return 0;
}

void virtio_reset(struct vdev *d)
{
	d->ready = 0;
	reset_wait(d);
	virtio_ack(d);
}

static const char *init_fail(struct vdev *d, const char *why)
{
	wr(d, VM_STATUS, rd(d, VM_STATUS) | ST_FAILED);
	d->ready = 0;
	return why;
}

const char *virtio_init(struct vdev *d, u64 want, u32 nq, u64 extra)
{
	d->ready = 0;
	if (!d->mem) {
		d->mem = pool_alloc(nq * VQ_PAGES * 4096UL + extra);
		if (!d->mem)
			return "no-memory";
		d->extra = d->mem + nq * VQ_PAGES * 4096UL;
	}
	if (!reset_wait(d))
		return "reset-stuck";
	virtio_ack(d);
	u32 st = ST_ACKNOWLEDGE;
	wr(d, VM_STATUS, st);
	st |= ST_DRIVER;
	wr(d, VM_STATUS, st);

	wr(d, VM_DEV_FEATURES_SEL, 0);
	u64 lo = rd(d, VM_DEV_FEATURES);
	wr(d, VM_DEV_FEATURES_SEL, 1);
	u64 hi = rd(d, VM_DEV_FEATURES);
	d->offered = lo | (hi << 32);
	if (!(d->offered & F_VERSION_1))
		return init_fail(d, "no-version-1");
	d->feat = d->offered & (want | F_VERSION_1);
	wr(d, VM_DRV_FEATURES_SEL, 0);
	wr(d, VM_DRV_FEATURES, (u32)d->feat);
	wr(d, VM_DRV_FEATURES_SEL, 1);
	wr(d, VM_DRV_FEATURES, (u32)(d->feat >> 32));
	st |= ST_FEATURES_OK;
	wr(d, VM_STATUS, st);
	if (!(rd(d, VM_STATUS) & ST_FEATURES_OK))
		return init_fail(d, "features-rejected");

	d->nq = nq;
	for (u32 i = 0; i < nq; i++) {
		struct vq *q = &d->q[i];
		wr(d, VM_QUEUE_SEL, i);
		if (rd(d, VM_QUEUE_READY))
			return init_fail(d, "queue-in-use");
		u32 max = rd(d, VM_QUEUE_NUM_MAX);
		if (!max)
			return init_fail(d, "no-queue");
		u32 n = VQ_MAX;
		while (n > max)
			n >>= 1;
		u64 m = d->mem + i * VQ_PAGES * 4096UL;
		q->size = n;
		q->avail_idx = 0;
		q->used_idx = 0;
		q->desc = (struct vdesc *)m;
		q->avail = m + 4096;
		q->used = m + 8192;
		w16(q->avail, 1);	/* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
		w16(q->avail + 2, 0);
		w32(q->used, 0);	/* flags, idx */
		barrier();
		wr(d, VM_QUEUE_NUM, n);
		wr(d, VM_QUEUE_DESC_LO, (u32)m);
		wr(d, VM_QUEUE_DESC_HI, (u32)(m >> 32));
		wr(d, VM_QUEUE_DRIVER_LO, (u32)q->avail);
		wr(d, VM_QUEUE_DRIVER_HI, (u32)(q->avail >> 32));
		wr(d, VM_QUEUE_DEVICE_LO, (u32)q->used);
		wr(d, VM_QUEUE_DEVICE_HI, (u32)(q->used >> 32));
		wr(d, VM_QUEUE_READY, 1);
	}
	st |= ST_DRIVER_OK;
	wr(d, VM_STATUS, st);
	u32 now = rd(d, VM_STATUS);
	if (now & ST_NEEDS_RESET)
		return init_fail(d, "needs-reset");
	if (!(now & ST_DRIVER_OK))
		return init_fail(d, "driver-ok-rejected");
	d->ready = 1;
	return 0;
}

int vq_wait(struct vdev *d, struct vq *q, u32 *id, u32 *len, u64 ticks)
{
	u64 t0 = rdtsc();
	for (u64 i = 0;; i++) {
		if (vq_get(q, id, len)) {
			virtio_ack(d);
			return 1;
		}
		/* Checking the status and the clock costs an exit and an instruction or two:
		 * not on every poll. */
		if ((i & 255) == 255) {
			if (rd(d, VM_STATUS) & ST_NEEDS_RESET)
				return -1;
			if (rdtsc() - t0 >= ticks || i >= WAIT_ITERS)
				return 0;
		}
		pause();
	}
}

/* ------------------------------------------------------------------------------------ */
/* Arguments and common output                                                          */

void split_args(const char *a, u32 len, struct args *out)
{
	out->n = 0;
	u32 s = 0;
	for (u32 i = 0; i <= len; i++) {
		if (i == len || a[i] == ':') {
			if (out->n < MAX_ARGS) {
				out->s[out->n] = a + s;
				out->l[out->n] = i - s;
				out->n++;
			} else {
				out->n = MAX_ARGS + 1;	/* too many */
				return;
			}
			s = i + 1;
		}
	}
}

int arg_u64(const struct args *a, u32 i, u64 *v)
{
	if (i >= a->n || !a->l[i] || a->l[i] > 19)
		return 0;
	u64 x = 0;
	for (u32 k = 0; k < a->l[i]; k++) {
		char c = a->s[i][k];
		if (c < '0' || c > '9')
			return 0;
		x = x * 10 + (u64)(c - '0');
	}
	*v = x;
	return 1;
}

int arg_ip(const struct args *a, u32 i, u32 *ip)
{
	if (i >= a->n)
		return 0;
	const char *s = a->s[i];
	u32 n = a->l[i], k = 0, v = 0;
	for (int part = 0; part < 4; part++) {
		u32 x = 0, digits = 0;
		while (k < n && s[k] >= '0' && s[k] <= '9' && digits < 3) {
			x = x * 10 + (u32)(s[k++] - '0');
			digits++;
		}
		if (!digits || x > 255)
			return 0;
		v = (v << 8) | x;
		if (part < 3) {
			if (k >= n || s[k] != '.')
				return 0;
			k++;
		}
	}
	if (k != n)
		return 0;
	*ip = v;
	return 1;
}

void print_ip(u32 ip)
{
	pdec(ip >> 24);
	ser_putc('.');
	pdec((ip >> 16) & 255);
	ser_putc('.');
	pdec((ip >> 8) & 255);
	ser_putc('.');
	pdec(ip & 255);
}

void dev_fail(const char *cmd, const char *pfx, u32 num, const char *reason)
{
	line_begin();
	ps("PROBE-FAIL ");
	ps(cmd);
	ser_putc(' ');
	ps(pfx);
	pdec(num);
	ser_putc(' ');
	ps(reason);
	line_end();
}

struct vdev *dev_get(const char *cmd, const char *pfx, u32 devid, u32 num)
{
	struct vdev *d = virtio_find(devid, num);
	if (!d) {
		dev_fail(cmd, pfx, num, "absent");
		return 0;
	}
	if (d->bad) {
		dev_fail(cmd, pfx, num, d->bad);
		return 0;
	}
	/* DEVICE_NEEDS_RESET raised since the last command: report it, reset and re-initialise,
	 * and skip this command (one result line per command). */
	int stale = d->ready && (rd(d, VM_STATUS) & ST_NEEDS_RESET);
	if (stale) {
		dev_fail(cmd, pfx, num, "needs-reset");
		virtio_reset(d);
	}
	if (!d->ready) {
		const char *why = devid == VIRTIO_ID_BLK ? blk_setup(d) : net_setup(d);
		if (why && !stale)
			dev_fail(cmd, pfx, num, why);
		if (why || stale)
			return 0;
	}
	return d;
}
