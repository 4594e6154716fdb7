/*
 * Kiln probe guest: virtio-blk driver and the blk-* commands (see README.md).
 * One request at a time except blk-bench and blk-rbench, which keep up to 16 in flight.
 */
#include "virtio.h"

#define BLK_F_SIZE_MAX (1UL << 1)
#define BLK_F_SEG_MAX (1UL << 2)
#define BLK_F_RO (1UL << 5)
#define BLK_F_BLK_SIZE (1UL << 6)
#define BLK_F_FLUSH (1UL << 9)
#define BLK_F_DISCARD (1UL << 13)
#define BLK_F_WRITE_ZEROES (1UL << 14)
#define BLK_WANT (BLK_F_SIZE_MAX | BLK_F_SEG_MAX | BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_FLUSH | \
		  BLK_F_DISCARD | BLK_F_WRITE_ZEROES)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

/* Negative request results (non-negative ones are the status byte). */
#define R_TIMEOUT (-1)
#define R_NEEDS_RESET (-2)
#define R_BAD_ID (-3)

/* The device's own page (d->extra): request headers, status bytes, id, discard segment. */
#define AUX_HDR 0x000		/* 16 slots x 16 bytes */
#define AUX_STATUS 0x100	/* 16 slots x 1 byte */
#define AUX_ID 0x200		/* 20 bytes (+ slack) */
#define AUX_SEG 0x300		/* discard / write-zeroes segment, 16 bytes */
#define AUX_SCRATCH 0x400	/* 'long' data descriptors, 16 bytes */
#define MAX_SLOTS 16

#define CHUNK (64UL << 10)	/* largest request of blk-write / blk-verify */
#define BUF_SIZE (1UL << 20)	/* data buffer; blk-bench points every segment at it */
static u8 blk_buf[BUF_SIZE] __attribute__((aligned(4096))) NOINIT;

/* Pattern template: byte j of a sector before the per-sector offset, i.e. 7*j. */
static u64 tmpl[64];
static int tmpl_done;

static void tmpl_init(void)
{
	if (tmpl_done)
		return;
	u64 w = 0;
	for (int k = 7; k >= 0; k--)
		w = (w << 8) | (u8)(7 * k);
	for (int i = 0; i < 64; i++) {
		tmpl[i] = w;
		w = swar_add(w, bcast8(56));
	}
	tmpl_done = 1;
}

/* Byte o of the disk for seed s is (u8)(s + 7*o + (o >> 9)); for o = 512*n + j that is
 * (u8)(s + n + 7*j) since 7*512 is a multiple of 256. */
static void fill_sector(u64 *p, u64 sector, u64 seed)
{
	u64 c = bcast8((u8)(seed + sector));
	for (int i = 0; i < 64; i++)
		p[i] = swar_add(tmpl[i], c);
}

const char *blk_setup(struct vdev *d)
{
	const char *why = virtio_init(d, BLK_WANT, 1, 4096);
	if (why)
		return why;
	u32 gen, lo, hi;
	do {
		gen = virtio_cfg_gen(d);
		lo = virtio_cfg32(d, 0);
		hi = virtio_cfg32(d, 4);
		d->size_max = d->feat & BLK_F_SIZE_MAX ? virtio_cfg32(d, 8) : 0;
		d->seg_max = d->feat & BLK_F_SEG_MAX ? virtio_cfg32(d, 12) : 0;
		d->blk_size = d->feat & BLK_F_BLK_SIZE ? virtio_cfg32(d, 20) : 512;
	} while (gen != virtio_cfg_gen(d));
	d->capacity = lo | ((u64)hi << 32);
	return 0;
}

/* Largest segment for a request: size_max when negotiated (and non-zero), else `cap`. */
static u32 seg_size(struct vdev *d, u32 cap)
{
	if ((d->feat & BLK_F_SIZE_MAX) && d->size_max && d->size_max < cap)
		return d->size_max;
	return cap;
}

/* Most segments per request: seg_max when negotiated, and the queue size minus 2. */
static u32 seg_limit(struct vdev *d)
{
	u32 n = d->q[0].size - 2;
	if ((d->feat & BLK_F_SEG_MAX) && d->seg_max && d->seg_max < n)
		n = d->seg_max;
	return n;
}

static void set_desc(struct vdev *d, u32 i, u64 addr, u32 len, u16 flags, u16 next)
{
	struct vdesc *v = &d->q[0].desc[i];
	v->addr = addr;
	v->len = len;
	v->flags = flags;
	v->next = next;
}

static void set_hdr(struct vdev *d, u32 slot, u32 type, u64 sector)
{
	u64 h = d->extra + AUX_HDR + 16 * slot;
	w32(h, type);
	w32(h + 4, 0);
	w64(h + 8, sector);
	w8(d->extra + AUX_STATUS + slot, 0xff);
}

/* Builds header, data (segments of at most segsz bytes; consecutive in memory, or all at
 * `buf` when `same` is set), status at descriptors first..; returns the count. */
static u32 build(struct vdev *d, u32 first, u32 slot, u32 type, u64 sector, u64 buf, u64 len,
		 u32 segsz, int dev_writes, int same)
{
	u32 i = first;
	set_hdr(d, slot, type, sector);
	set_desc(d, i, d->extra + AUX_HDR + 16 * slot, 16, VD_NEXT, (u16)(i + 1));
	i++;
	for (u64 off = 0; off < len; off += segsz) {
		u64 n = len - off < segsz ? len - off : segsz;
		set_desc(d, i, same ? buf : buf + off, (u32)n,
			 (u16)(VD_NEXT | (dev_writes ? VD_WRITE : 0)), (u16)(i + 1));
		i++;
	}
	set_desc(d, i, d->extra + AUX_STATUS + slot, 1, VD_WRITE, 0);
	return i + 1 - first;
}

/* Submits the chain at descriptor 0 and waits for it: status byte or R_*. */
static int run_slot0(struct vdev *d)
{
	struct vq *q = &d->q[0];
	vq_add(q, 0);
	vq_kick(d, 0);
	u32 id, len;
	int r = vq_wait(d, q, &id, &len, WAIT_TICKS);
	if (r == 0)
		return R_TIMEOUT;
	if (r < 0)
		return R_NEEDS_RESET;
	if (id != 0)
		return R_BAD_ID;
	return r8(d->extra + AUX_STATUS);
}

static int blk_req(struct vdev *d, u32 type, u64 sector, u64 buf, u64 len, int dev_writes)
{
	build(d, 0, 0, type, sector, buf, len, seg_size(d, CHUNK), dev_writes, 0);
	return run_slot0(d);
}

/* Largest data length of one blk-write / blk-verify request (multiple of 512). */
static u64 chunk_bytes(struct vdev *d)
{
	u64 n = (u64)seg_size(d, CHUNK) * seg_limit(d);
	if (n > CHUNK)
		n = CHUNK;
	return n & ~511UL;
}

static void recover(struct vdev *d)
{
	virtio_reset(d);
	blk_setup(d);	/* a failure shows on the next command */
}

/* "PROBE-FAIL <cmd> blkN status=<n>|timeout|needs-reset|bad-used-id"; resets the device
 * after the transport-level failures. */
static void req_fail(const char *cmd, struct vdev *d, int r)
{
	line_begin();
	ps("PROBE-FAIL ");
	ps(cmd);
	ps(" blk");
	pdec(d->num);
	if (r >= 0) {
		ps(" status=");
		pdec((u32)r);
	} else {
		ps(r == R_TIMEOUT ? " timeout" : r == R_NEEDS_RESET ? " needs-reset" : " bad-used-id");
	}
	line_end();
	if (r < 0)
		recover(d);
}

static void ok_line(const char *cmd, struct vdev *d, const char *rest, u64 n, int with_n)
{
	line_begin();
	ps("PROBE-OK ");
	ps(cmd);
	ps(" blk");
	pdec(d->num);
	ps(rest);
	if (with_n)
		pdec(n);
	line_end();
}

/* Parses "DEV[:...]" with `want` numeric fields (DEV included) into v[]; finds the device. */
static struct vdev *get(const char *cmd, const char *a, u32 len, u32 want, u64 *v)
{
	struct args ar;
	split_args(a, len, &ar);
	int ok = ar.n == want;
	for (u32 i = 0; ok && i < want; i++)
		ok = arg_u64(&ar, i, &v[i]);
	if (!ok || v[0] > 0xffff) {
		line_begin();
		ps("PROBE-FAIL ");
		ps(cmd);
		ps(" bad-args");
		line_end();
		return 0;
	}
	return dev_get(cmd, "blk", VIRTIO_ID_BLK, (u32)v[0]);
}

void cmd_blk_info(const char *a, u32 len)
{
	u64 v[1];
	struct vdev *d = get("blk-info", a, len, 1, v);
	if (!d)
		return;
	u32 gen, lo, hi;
	do {
		gen = virtio_cfg_gen(d);
		lo = virtio_cfg32(d, 0);
		hi = virtio_cfg32(d, 4);
	} while (gen != virtio_cfg_gen(d));
	d->capacity = lo | ((u64)hi << 32);
	line_begin();
	ps("PROBE-OK blk-info blk");
	pdec(d->num);
	ps(" capacity=");
	pdec(d->capacity);
	ps(" blk_size=");
	pdec(d->blk_size);
	ps(" seg_max=");
	pdec(d->seg_max);
	ps(" ro=");
	pdec(!!(d->feat & BLK_F_RO));
	ps(" flush=");
	pdec(!!(d->feat & BLK_F_FLUSH));
	ps(" discard=");
	pdec(!!(d->feat & BLK_F_DISCARD));
	ps(" write_zeroes=");
	pdec(!!(d->feat & BLK_F_WRITE_ZEROES));
	line_end();
}

void cmd_blk_write(const char *a, u32 len)
{
	u64 v[4];
	struct vdev *d = get("blk-write", a, len, 4, v);
	if (!d)
		return;
	tmpl_init();
	u64 sector = v[1], count = v[2], seed = v[3];
	u64 per = chunk_bytes(d) >> 9;
	if (!per) {
		dev_fail("blk-write", "blk", d->num, "limits");
		return;
	}
	for (u64 done = 0; done < count;) {
		u64 n = count - done < per ? count - done : per;
		for (u64 i = 0; i < n; i++)
			fill_sector((u64 *)(blk_buf + 512 * i), sector + done + i, seed);
		int r = blk_req(d, T_OUT, sector + done, (u64)blk_buf, n << 9, 0);
		if (r) {
			req_fail("blk-write", d, r);
			return;
		}
		done += n;
	}
	ok_line("blk-write", d, " sectors=", count, 1);
}

void cmd_blk_verify(const char *a, u32 len)
{
	u64 v[4];
	struct vdev *d = get("blk-verify", a, len, 4, v);
	if (!d)
		return;
	tmpl_init();
	u64 sector = v[1], count = v[2], seed = v[3];
	u64 per = chunk_bytes(d) >> 9;
	if (!per) {
		dev_fail("blk-verify", "blk", d->num, "limits");
		return;
	}
	for (u64 done = 0; done < count;) {
		u64 n = count - done < per ? count - done : per;
		int r = blk_req(d, T_IN, sector + done, (u64)blk_buf, n << 9, 1);
		if (r) {
			req_fail("blk-verify", d, r);
			return;
		}
		for (u64 i = 0; i < n; i++) {
			u64 sec = sector + done + i;
			const u64 *p = (const u64 *)(blk_buf + 512 * i);
			u64 c = bcast8((u8)(seed + sec));
			for (int w = 0; w < 64; w++) {
				u64 want = swar_add(tmpl[w], c);
				if (p[w] == want)
					continue;
				u64 got = p[w];
				int k = 0;
				while (!(((got ^ want) >> (8 * k)) & 0xff))
					k++;
				line_begin();
				ps("PROBE-FAIL blk-verify blk");
				pdec(d->num);
				ps(" offset=");
				pdec(sec * 512 + 8 * (u64)w + (u64)k);
				ps(" got=");
				phex_w((got >> (8 * k)) & 0xff, 2);
				ps(" want=");
				phex_w((want >> (8 * k)) & 0xff, 2);
				line_end();
				return;
			}
		}
		done += n;
	}
	ok_line("blk-verify", d, " sectors=", count, 1);
}

void cmd_blk_flush(const char *a, u32 len)
{
	u64 v[1];
	struct vdev *d = get("blk-flush", a, len, 1, v);
	if (!d)
		return;
	int r = blk_req(d, T_FLUSH, 0, 0, 0, 0);
	if (r)
		req_fail("blk-flush", d, r);
	else
		ok_line("blk-flush", d, "", 0, 0);
}

void cmd_blk_id(const char *a, u32 len)
{
	u64 v[1];
	struct vdev *d = get("blk-id", a, len, 1, v);
	if (!d)
		return;
	u64 id = d->extra + AUX_ID;
	for (u32 i = 0; i < 20; i += 4)
		w32(id + i, 0);
	int r = blk_req(d, T_GET_ID, 0, id, 20, 1);
	if (r) {
		req_fail("blk-id", d, r);
		return;
	}
	line_begin();
	ps("PROBE-OK blk-id blk");
	pdec(d->num);
	ser_putc(' ');
	for (u32 i = 0; i < 20; i++) {
		char c = (char)r8(id + i);
		if (!c)
			break;
		ser_putc(c > 0x20 && c < 0x7f ? c : '?');
	}
	line_end();
}

static void seg_cmd(const char *cmd, u32 type, const char *a, u32 len)
{
	u64 v[3];
	struct vdev *d = get(cmd, a, len, 3, v);
	if (!d)
		return;
	u64 seg = d->extra + AUX_SEG;
	w64(seg, v[1]);
	w32(seg + 8, (u32)v[2]);
	w32(seg + 12, 0);
	build(d, 0, 0, type, 0, seg, 16, 16, 0, 0);
	int r = run_slot0(d);
	if (r)
		req_fail(cmd, d, r);
	else
		ok_line(cmd, d, "", 0, 0);
}

void cmd_blk_discard(const char *a, u32 len) { seg_cmd("blk-discard", T_DISCARD, a, len); }
void cmd_blk_zeroes(const char *a, u32 len) { seg_cmd("blk-zeroes", T_WRITE_ZEROES, a, len); }

/* ------------------------------------------------------------------------------------ */
/* blk-bad: deliberately malformed requests                                              */

static const char *const bad_kinds[] = {
	"short", "no-status", "oob", "wrong-dir", "overflow", "loop", "bad-next", "long",
	"bad-type", "ro-write",
};

void cmd_blk_bad(const char *a, u32 len)
{
	u32 c = 0;
	while (c < len && a[c] != ':')
		c++;
	u32 kind = 0, nk = sizeof(bad_kinds) / sizeof(bad_kinds[0]);
	const char *ks = a + (c < len ? c + 1 : len);
	u32 kl = c < len ? len - c - 1 : 0;
	while (kind < nk) {
		const char *k = bad_kinds[kind];
		u32 i = 0;
		while (i < kl && k[i] && k[i] == ks[i])
			i++;
		if (i == kl && !k[i])
			break;
		kind++;
	}
	u64 v[1];
	if (kind == nk) {
		say("PROBE-FAIL blk-bad bad-args");
		return;
	}
	struct vdev *d = get("blk-bad", a, c, 1, v);
	if (!d)
		return;
	const char *kn = bad_kinds[kind];
	u64 hdr = d->extra + AUX_HDR, st = d->extra + AUX_STATUS, buf = (u64)blk_buf;
	u32 qs = d->q[0].size;

	/* The write-type cases write back what sector 0 holds, so a device that wrongly
	 * accepts them leaves the disk unchanged. */
	if (kind == 1 || kind == 9) {
		int r = blk_req(d, T_IN, 0, buf, 512, 1);
		if (r) {
			req_fail("blk-bad", d, r);
			return;
		}
	}
	switch (kind) {
	case 0:		/* short: the header alone */
		set_hdr(d, 0, T_IN, 0);
		set_desc(d, 0, hdr, 16, 0, 0);
		break;
	case 1:		/* no-status: header + device-readable data, nothing writable */
		set_hdr(d, 0, T_OUT, 0);
		set_desc(d, 0, hdr, 16, VD_NEXT, 1);
		set_desc(d, 1, buf, 512, 0, 0);
		break;
	case 2:		/* oob: data outside guest memory */
		build(d, 0, 0, T_IN, 0, 0x7ffffffff000UL, 512, 512, 1, 0);
		break;
	case 3:		/* wrong-dir: a read into a device-readable buffer */
		build(d, 0, 0, T_IN, 0, buf, 512, 512, 0, 0);
		break;
	case 4:		/* overflow: a 4 GiB - 1 data descriptor (a write: nothing lands in RAM) */
		build(d, 0, 0, T_OUT, 0, buf, 512, 512, 0, 0);
		d->q[0].desc[1].len = 0xffffffff;
		break;
	case 5:		/* loop: a descriptor that chains to itself */
		set_hdr(d, 0, T_IN, 0);
		set_desc(d, 0, hdr, 16, VD_NEXT, 0);
		break;
	case 6:		/* bad-next: next index beyond the queue */
		set_hdr(d, 0, T_IN, 0);
		set_desc(d, 0, hdr, 16, VD_NEXT, (u16)qs);
		break;
	case 7:		/* long: every descriptor chained in a cycle */
		set_hdr(d, 0, T_IN, 0);
		set_desc(d, 0, hdr, 16, VD_NEXT, 1);
		for (u32 i = 1; i < qs; i++)
			set_desc(d, i, d->extra + AUX_SCRATCH, 16, VD_NEXT | VD_WRITE,
				 (u16)((i + 1) & (qs - 1)));
		break;
	case 8:		/* bad-type */
		build(d, 0, 0, 0x7777, 0, buf, 512, 512, 1, 0);
		break;
	default:	/* ro-write: an ordinary write */
		build(d, 0, 0, T_OUT, 0, buf, 512, 512, 0, 0);
		break;
	}
	int r = run_slot0(d);
	if (r == R_BAD_ID)
		r = r8(st);
	line_begin();
	ps(r == 0 ? "PROBE-FAIL blk-bad blk" : "PROBE-OK blk-bad blk");
	pdec(d->num);
	ser_putc(' ');
	ps(kn);
	if (r >= 0) {
		ps(" status=");
		pdec((u32)r);
	} else {
		ps(r == R_TIMEOUT ? " no-completion" : " needs-reset");
	}
	line_end();
	recover(d);
}

/* ------------------------------------------------------------------------------------ */
/* blk-bench, blk-rbench                                                                */

/* The offset generator of blk-rbench: xorshift64 (13, 7, 17) from a fixed seed. */
#define RBENCH_SEED 0x9e3779b97f4a7c15UL

static u64 xorshift64(u64 *x)
{
	u64 v = *x;
	v ^= v << 13;
	v ^= v >> 7;
	v ^= v << 17;
	*x = v;
	return v;
}

/* Parses "DEV:MIB:REQKB:r|w" (and ":COUNT" when `count` is set) for `cmd`; returns the
 * device or 0 after printing the failure. */
static struct vdev *bench_args(const char *cmd, const char *a, u32 len, u64 *mib, u64 *kb,
			       int *wr, u64 *count)
{
	struct args ar;
	split_args(a, len, &ar);
	u32 want = count ? 5 : 4;
	u64 dev;
	*wr = ar.n == want && ar.l[3] == 1 && ar.s[3][0] == 'w';
	int rd = ar.n == want && ar.l[3] == 1 && ar.s[3][0] == 'r';
	if ((!*wr && !rd) || !arg_u64(&ar, 0, &dev) || !arg_u64(&ar, 1, mib) ||
	    !arg_u64(&ar, 2, kb) || !*kb || *kb > (1UL << 22) || *mib > (1UL << 30) ||
	    dev > 0xffff || (count && (!arg_u64(&ar, 4, count) || *count > (1UL << 40)))) {
		line_begin();
		ps("PROBE-FAIL ");
		ps(cmd);
		ps(" bad-args");
		line_end();
		return 0;
	}
	return dev_get(cmd, "blk", VIRTIO_ID_BLK, (u32)dev);
}

/* Runs `nreq` requests of `req` bytes over the first `total` bytes: sequential from 0
 * (the last one may be short), or at xorshift64-chosen req-aligned offsets (`random`). */
static void bench_run(const char *cmd, struct vdev *d, u64 total, u64 req, u64 nreq, int wr,
		      int random)
{
	struct vq *q = &d->q[0];
	u32 segsz = seg_size(d, BUF_SIZE);
	u64 segs = (req + segsz - 1) / segsz;
	if (segs > seg_limit(d)) {
		dev_fail(cmd, "blk", d->num, "request-too-large");
		return;
	}
	if (total > d->capacity * 512) {
		dev_fail(cmd, "blk", d->num, "disk-too-small");
		return;
	}
	u64 slots = total / req;	/* random: the req-aligned offsets that fit */
	if (random && !slots) {
		dev_fail(cmd, "blk", d->num, "request-too-large");
		return;
	}
	u32 per = (u32)segs + 2;
	u32 inflight = q->size / per;
	if (inflight > MAX_SLOTS)
		inflight = MAX_SLOTS;
	u32 freeslots[MAX_SLOTS], nfree = 0;
	u8 busy[MAX_SLOTS];
	for (u32 i = inflight; i > 0; i--) {
		freeslots[nfree++] = i - 1;
		busy[i - 1] = 0;
	}
	u64 sent = 0, done = 0, off = 0, bytes = 0, rng = RBENCH_SEED;
	u32 type = wr ? T_OUT : T_IN;

	line_begin();
	ps("PROBE-BENCH-START blk");
	pdec(d->num);
	line_end();
	while (done < nreq) {
		int added = 0;
		while (nfree && sent < nreq) {
			u32 slot = freeslots[--nfree];
			busy[slot] = 1;
			u64 n = req;
			if (random)
				off = xorshift64(&rng) % slots * req;
			else if (total - off < req)
				n = total - off;
			build(d, slot * per, slot, type, off >> 9, (u64)blk_buf, n, segsz, !wr, 1);
			vq_add(q, (u16)(slot * per));
			if (!random)
				off += n;
			bytes += n;
			sent++;
			added = 1;
		}
		if (added)
			vq_kick(d, 0);
		u32 id, l;
		int r = vq_wait(d, q, &id, &l, WAIT_TICKS);
		if (r <= 0) {
			req_fail(cmd, d, r ? R_NEEDS_RESET : R_TIMEOUT);
			return;
		}
		do {
			u32 slot = id / per;
			if (id % per || slot >= inflight || !busy[slot]) {
				req_fail(cmd, d, R_BAD_ID);
				return;
			}
			u8 s = r8(d->extra + AUX_STATUS + slot);
			if (s) {
				req_fail(cmd, d, s);
				recover(d);	/* other requests may still be in flight */
				return;
			}
			busy[slot] = 0;
			freeslots[nfree++] = slot;
			done++;
		} while (vq_get(q, &id, &l));
	}
	line_begin();
	ps("PROBE-BENCH-END blk");
	pdec(d->num);
	ps(" bytes=");
	pdec(bytes);
	ps(" requests=");
	pdec(nreq);
	line_end();
}

void cmd_blk_bench(const char *a, u32 len)
{
	u64 mib, kb;
	int wr;
	struct vdev *d = bench_args("blk-bench", a, len, &mib, &kb, &wr, 0);
	if (!d)
		return;
	u64 total = mib << 20, req = kb << 10;
	bench_run("blk-bench", d, total, req, (total + req - 1) / req, wr, 0);
}

void cmd_blk_rbench(const char *a, u32 len)
{
	u64 mib, kb, count;
	int wr;
	struct vdev *d = bench_args("blk-rbench", a, len, &mib, &kb, &wr, &count);
	if (!d)
		return;
	bench_run("blk-rbench", d, mib << 20, kb << 10, count, wr, 1);
}
