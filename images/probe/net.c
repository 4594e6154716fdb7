/*
 * Kiln probe guest: virtio-net driver and the net-* commands (see README.md).
 * VIRTIO_NET_F_MAC and VERSION_1 only: no offloads, no mergeable buffers, no control queue;
 * the 12-byte virtio_net_hdr precedes every frame. Queue 0 receives, queue 1 transmits.
 * A minimal ARP / IPv4 / ICMP echo / UDP stack, enough for the host to talk to the probe.
 */
#include "virtio.h"

#define NET_F_MAC (1UL << 5)

#define HDR 12			/* struct virtio_net_hdr with num_buffers */
#define RX_BUFS 32
#define RX_LEN (HDR + 1526)
#define BUF_STRIDE 2048
#define RX_AREA (RX_BUFS * BUF_STRIDE)
#define NET_EXTRA (RX_AREA + MAX_TX_SLOTS * BUF_STRIDE)
#define MAX_PAYLOAD 1472	/* UDP payload in a 1500-byte IP packet */

#define SILENCE_TICKS (30 * WAIT_TICKS)	/* ~60 s */
#define SILENCE_ITERS (30 * WAIT_ITERS)

static u64 rxbuf(struct vdev *d, u32 i) { return d->extra + (u64)i * BUF_STRIDE; }
static u64 txbuf(struct vdev *d, u32 i) { return d->extra + RX_AREA + (u64)i * BUF_STRIDE; }

static u16 be16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static u32 be32(const u8 *p) { return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3]; }
static void st16(u8 *p, u32 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}
static void st32(u8 *p, u32 v)
{
	st16(p, v >> 16);
	st16(p + 2, v);
}
static void cpy(u8 *d, const u8 *s, u32 n)
{
	while (n >= 8) {
		*(u64u *)d = *(const u64u *)s;
		d += 8;
		s += 8;
		n -= 8;
	}
	while (n--)
		*d++ = *s++;
}

/* Internet checksum; byte-order independent, so summing little-endian words and storing
 * the result as a little-endian word gives the right bytes. */
static u16 csum(const u8 *p, u32 n)
{
	u64 s = 0;
	for (; n >= 2; n -= 2, p += 2)
		s += *(const u16u *)p;
	if (n)
		s += *p;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}

const char *net_setup(struct vdev *d)
{
	const char *why = virtio_init(d, NET_F_MAC, 2, NET_EXTRA);
	if (why)
		return why;
	if (d->feat & NET_F_MAC) {
		u32 gen;
		do {
			gen = virtio_cfg_gen(d);
			for (u32 i = 0; i < 6; i++)
				d->mac[i] = virtio_cfg8(d, i);
		} while (gen != virtio_cfg_gen(d));
	} else {
		/* locally administered 02:6b:69:6c:6e:<N> ("kiln") */
		d->mac[0] = 0x02;
		d->mac[1] = 0x6b;
		d->mac[2] = 0x69;
		d->mac[3] = 0x6c;
		d->mac[4] = 0x6e;
		d->mac[5] = (u8)d->num;
	}
	struct vq *rq = &d->q[0], *tq = &d->q[1];
	d->nrx = rq->size < RX_BUFS ? rq->size : RX_BUFS;
	for (u32 i = 0; i < d->nrx; i++) {
		rq->desc[i] = (struct vdesc){ rxbuf(d, i), RX_LEN, VD_WRITE, 0 };
		vq_add(rq, (u16)i);
	}
	vq_kick(d, 0);
	d->ntx = tq->size < MAX_TX_SLOTS ? tq->size : MAX_TX_SLOTS;
	d->ntxfree = 0;
	for (u32 i = d->ntx; i > 0; i--) {
		u8 *b = (u8 *)txbuf(d, i - 1);
		for (u32 k = 0; k < HDR; k++)
			b[k] = 0;	/* no checksum offload, GSO_NONE */
		tq->desc[i - 1] = (struct vdesc){ (u64)b, 0, 0, 0 };
		d->txbusy[i - 1] = 0;
		d->txfree[d->ntxfree++] = i - 1;
	}
	return 0;
}

/* ------------------------------------------------------------------------------------ */

struct nctx {
	struct vdev *d;
	const char *cmd;
	int serve;		/* answer ICMP echo and UDP port 7 */
	u32 answered, rx, tx;
	u32 want_ip;		/* ARP resolution in progress */
	int found;
	u8 peer[6];
	int err;		/* 0, -1 timeout, -2 needs-reset, -3 bad used id */
};

static void tx_reap(struct nctx *c)
{
	struct vdev *d = c->d;
	u32 id, len;
	while (vq_get(&d->q[1], &id, &len)) {
		if (id >= d->ntx || !d->txbusy[id]) {
			c->err = -3;
			continue;
		}
		d->txbusy[id] = 0;
		d->txfree[d->ntxfree++] = id;
	}
}

/* A free TX buffer (waiting for one if needed), or -1 with c->err set. */
static int tx_slot(struct nctx *c)
{
	struct vdev *d = c->d;
	tx_reap(c);
	if (!d->ntxfree) {
		u32 id, len;
		int r = vq_wait(d, &d->q[1], &id, &len, WAIT_TICKS);
		if (r <= 0) {
			c->err = r ? -2 : -1;
			return -1;
		}
		d->q[1].used_idx--;	/* let tx_reap take it with the others */
		tx_reap(c);
		if (!d->ntxfree)
			return -1;
	}
	u32 s = d->txfree[--d->ntxfree];
	d->txbusy[s] = 1;
	return (int)s;
}

static u8 *frame(struct vdev *d, int slot) { return (u8 *)txbuf(d, (u32)slot) + HDR; }

/* Queues the frame in `slot` (flen bytes after the header, padded to 60). */
static void tx_queue(struct nctx *c, int slot, u32 flen, int kick)
{
	struct vdev *d = c->d;
	u8 *f = frame(d, slot);
	for (; flen < 60; flen++)
		f[flen] = 0;
	d->q[1].desc[slot].len = HDR + flen;
	vq_add(&d->q[1], (u16)slot);
	if (kick)
		vq_kick(d, 1);
	c->tx++;
}

/* Waits for every queued frame to complete. */
static void tx_drain(struct nctx *c)
{
	struct vdev *d = c->d;
	while (!c->err && d->ntxfree < d->ntx) {
		tx_reap(c);
		if (d->ntxfree >= d->ntx)
			break;
		u32 id, len;
		int r = vq_wait(d, &d->q[1], &id, &len, WAIT_TICKS);
		if (r <= 0) {
			c->err = r ? -2 : -1;
			return;
		}
		d->q[1].used_idx--;
	}
}

static void eth(u8 *f, const u8 *dst, const u8 *src, u32 type)
{
	cpy(f, dst, 6);
	cpy(f + 6, src, 6);
	st16(f + 12, type);
}

static void send_arp(struct nctx *c, u32 op, const u8 *dmac, const u8 *tha, u32 tpa)
{
	struct vdev *d = c->d;
	int s = tx_slot(c);
	if (s < 0)
		return;
	u8 *f = frame(d, s);
	eth(f, dmac, d->mac, 0x0806);
	st16(f + 14, 1);
	st16(f + 16, 0x0800);
	f[18] = 6;
	f[19] = 4;
	st16(f + 20, op);
	cpy(f + 22, d->mac, 6);
	st32(f + 28, d->ip);
	cpy(f + 32, tha, 6);
	st32(f + 38, tpa);
	tx_queue(c, s, 42, 1);
}

/* Ethernet + IPv4 header (20 bytes, DF, TTL 64) for `l4len` bytes of protocol `proto`;
 * returns the L4 start. */
static u8 *ipv4(struct vdev *d, u8 *f, const u8 *dmac, u32 dst, u32 proto, u32 l4len)
{
	eth(f, dmac, d->mac, 0x0800);
	u8 *ip = f + 14;
	ip[0] = 0x45;
	ip[1] = 0;
	st16(ip + 2, 20 + l4len);
	st16(ip + 4, d->ipid++);
	st16(ip + 6, 0x4000);
	ip[8] = 64;
	ip[9] = (u8)proto;
	st16(ip + 10, 0);
	st32(ip + 12, d->ip);
	st32(ip + 16, dst);
	*(u16u *)(ip + 10) = csum(ip, 20);
	return ip + 20;
}

static void handle_ip(struct nctx *c, const u8 *f, u32 len)
{
	struct vdev *d = c->d;
	const u8 *ip = f + 14;
	if (len < 34 || (ip[0] >> 4) != 4)
		return;
	u32 ihl = (ip[0] & 15) * 4u, tot = be16(ip + 2);
	if (ihl < 20 || tot < ihl || tot > len - 14 || tot > 1500)
		return;
	if ((be16(ip + 6) & 0x3fff) || be32(ip + 16) != d->ip)
		return;		/* fragments; not for us */
	const u8 *l4 = ip + ihl;
	u32 l4len = tot - ihl, src = be32(ip + 12);
	if (ip[9] == 1 && l4len >= 8 && l4[0] == 8 && l4[1] == 0) {
		int s = tx_slot(c);
		if (s < 0)
			return;
		u8 *o = ipv4(d, frame(d, s), f + 6, src, 1, l4len);
		cpy(o, l4, l4len);
		o[0] = 0;	/* echo reply */
		o[2] = 0;
		o[3] = 0;
		*(u16u *)(o + 2) = csum(o, l4len);
		tx_queue(c, s, 34 + l4len, 1);
		c->answered++;
	} else if (ip[9] == 17 && l4len >= 8 && be16(l4 + 2) == 7) {
		u32 ulen = be16(l4 + 4);
		if (ulen < 8 || ulen > l4len)
			return;
		int s = tx_slot(c);
		if (s < 0)
			return;
		u8 *o = ipv4(d, frame(d, s), f + 6, src, 17, ulen);
		st16(o, 7);
		cpy(o + 2, l4, 2);	/* back to the sender's port */
		st16(o + 4, ulen);
		st16(o + 6, 0);		/* no checksum */
		cpy(o + 8, l4 + 8, ulen - 8);
		tx_queue(c, s, 34 + ulen, 1);
		c->answered++;
	}
}

static void handle(struct nctx *c, const u8 *f, u32 len)
{
	struct vdev *d = c->d;
	c->rx++;
	if (len < 14)
		return;
	u32 type = be16(f + 12);
	if (type == 0x0806 && len >= 42 && be16(f + 14) == 1 && be16(f + 16) == 0x0800 &&
	    f[18] == 6 && f[19] == 4) {
		u32 op = be16(f + 20), spa = be32(f + 28), tpa = be32(f + 38);
		if (c->want_ip && spa == c->want_ip && (op == 1 || op == 2)) {
			cpy(c->peer, f + 22, 6);
			c->found = 1;
		}
		if (op == 1 && d->ip && tpa == d->ip)
			send_arp(c, 2, f + 22, f + 22, spa);
	} else if (type == 0x0800 && c->serve && d->ip) {
		handle_ip(c, f, len);
	}
}

/* Handles every received frame and gives the buffers back. */
static void rx_poll(struct nctx *c)
{
	struct vdev *d = c->d;
	struct vq *q = &d->q[0];
	u32 id, len, n = 0;
	while (vq_get(q, &id, &len)) {
		if (id >= d->nrx) {
			c->err = -3;
			continue;
		}
		if (len > RX_LEN)
			len = RX_LEN;
		handle(c, (const u8 *)rxbuf(d, id) + HDR, len > HDR ? len - HDR : 0);
		vq_add(q, (u16)id);
		n++;
	}
	if (n) {
		vq_kick(d, 0);
		virtio_ack(d);
	}
}

/* ------------------------------------------------------------------------------------ */

static void bad_args(const char *cmd)
{
	line_begin();
	ps("PROBE-FAIL ");
	ps(cmd);
	ps(" bad-args");
	line_end();
}

static struct vdev *get(const char *cmd, struct args *ar, u32 nargs, const char *a, u32 len)
{
	u64 dev;
	split_args(a, len, ar);
	if (ar->n != nargs || !arg_u64(ar, 0, &dev) || dev > 0xffff) {
		bad_args(cmd);
		return 0;
	}
	return dev_get(cmd, "net", VIRTIO_ID_NET, (u32)dev);
}

static void ctx_init(struct nctx *c, struct vdev *d, const char *cmd)
{
	*c = (struct nctx){ 0 };
	c->d = d;
	c->cmd = cmd;
}

/* Reports a transport failure and brings the device back. Returns 1 if there was one. */
static int net_err(struct nctx *c)
{
	if (!c->err)
		return 0;
	dev_fail(c->cmd, "net", c->d->num,
		 c->err == -1 ? "timeout" : c->err == -2 ? "needs-reset" : "bad-used-id");
	virtio_reset(c->d);
	net_setup(c->d);
	return 1;
}

void cmd_net_info(const char *a, u32 len)
{
	struct args ar;
	struct vdev *d = get("net-info", &ar, 1, a, len);
	if (!d)
		return;
	line_begin();
	ps("PROBE-OK net-info net");
	pdec(d->num);
	ps(" mac=");
	for (u32 i = 0; i < 6; i++) {
		if (i)
			ser_putc(':');
		ser_putc("0123456789abcdef"[d->mac[i] >> 4]);
		ser_putc("0123456789abcdef"[d->mac[i] & 15]);
	}
	line_end();
}

void cmd_net_ip(const char *a, u32 len)
{
	struct args ar;
	u32 ip;
	split_args(a, len, &ar);
	if (ar.n != 2 || !arg_ip(&ar, 1, &ip)) {
		bad_args("net-ip");
		return;
	}
	struct vdev *d = get("net-ip", &ar, 2, a, len);
	if (!d)
		return;
	d->ip = ip;
	line_begin();
	ps("PROBE-OK net-ip net");
	pdec(d->num);
	ser_putc(' ');
	print_ip(ip);
	line_end();
}

void cmd_net_serve(const char *a, u32 len)
{
	struct args ar;
	u64 n;
	struct vdev *d = get("net-serve", &ar, 2, a, len);
	if (!d)
		return;
	if (!arg_u64(&ar, 1, &n)) {
		bad_args("net-serve");
		return;
	}
	if (!d->ip) {
		dev_fail("net-serve", "net", d->num, "no-ip");
		return;
	}
	struct nctx c;
	ctx_init(&c, d, "net-serve");
	c.serve = 1;
	u64 t0 = rdtsc(), idle = 0;
	while (c.answered < n) {
		u32 before = c.rx;
		rx_poll(&c);
		if (c.err)
			break;
		if (c.rx != before) {
			t0 = rdtsc();
			idle = 0;
			continue;
		}
		if ((++idle & 255) == 0) {
			tx_reap(&c);
			if (r32(d->base + VM_STATUS) & ST_NEEDS_RESET) {
				c.err = -2;
				break;
			}
			if (rdtsc() - t0 >= SILENCE_TICKS || idle >= SILENCE_ITERS) {
				tx_drain(&c);
				line_begin();
				ps("PROBE-FAIL net-serve net");
				pdec(d->num);
				ps(" answered=");
				pdec(c.answered);
				ps(" timeout");
				line_end();
				return;
			}
		}
		pause();
	}
	tx_drain(&c);
	if (net_err(&c))
		return;
	line_begin();
	ps("PROBE-OK net-serve net");
	pdec(d->num);
	ps(" answered=");
	pdec(c.answered);
	ps(" rx=");
	pdec(c.rx);
	ps(" tx=");
	pdec(c.tx);
	line_end();
}

static const u8 bcast_mac[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static const u8 zero_mac[6] = { 0 };

/* ARP for `ip`: 5 requests ~0.4 s apart. */
static int resolve(struct nctx *c, u32 ip)
{
	c->want_ip = ip;
	for (int tries = 0; tries < 5 && !c->found && !c->err; tries++) {
		send_arp(c, 1, bcast_mac, zero_mac, ip);
		u64 t0 = rdtsc();
		for (u64 i = 0; !c->found && !c->err; i++) {
			rx_poll(c);
			tx_reap(c);
			if (rdtsc() - t0 >= WAIT_TICKS / 5 || i >= WAIT_ITERS / 5)
				break;
			pause();
		}
	}
	c->want_ip = 0;
	return c->found;
}

/* Parses DEV:A.B.C.D:PORT:COUNT:SIZE, checks the IP, resolves the peer. */
static struct vdev *udp_setup(const char *cmd, const char *a, u32 len, struct nctx *c, u32 *ip,
			      u64 *port, u64 *count, u64 *size)
{
	struct args ar;
	split_args(a, len, &ar);
	if (ar.n != 5 || !arg_ip(&ar, 1, ip) || !arg_u64(&ar, 2, port) || *port > 65535 ||
	    !arg_u64(&ar, 3, count) || !arg_u64(&ar, 4, size) || *size > MAX_PAYLOAD ||
	    *count > 0xffffffffUL) {
		bad_args(cmd);
		return 0;
	}
	struct vdev *d = get(cmd, &ar, 5, a, len);
	if (!d)
		return 0;
	if (!d->ip) {
		dev_fail(cmd, "net", d->num, "no-ip");
		return 0;
	}
	ctx_init(c, d, cmd);
	if (!resolve(c, *ip)) {
		if (!net_err(c))
			dev_fail(cmd, "net", d->num, "no-arp-reply");
		return 0;
	}
	return d;
}

/* Payload bytes i = (u8)(k*13 + i), i >= 4; bytes 0..3 = k little-endian. */
static void payload(u8 *p, u32 size, u32 k)
{
	u64 t = 0x0706050403020100UL, c = bcast8((u8)(k * 13));
	u32 i = 0;
	for (; i + 8 <= size; i += 8) {
		*(u64u *)(p + i) = swar_add(t, c);
		t = swar_add(t, bcast8(8));
	}
	u64 w = swar_add(t, c);
	for (; i < size; i++, w >>= 8)
		p[i] = (u8)w;
	for (i = 0; i < 4 && i < size; i++)
		p[i] = (u8)(k >> (8 * i));
}

static u8 *udp_frame(struct vdev *d, int s, const u8 *peer, u32 ip, u32 port, u32 size)
{
	u8 *o = ipv4(d, frame(d, s), peer, ip, 17, 8 + size);
	st16(o, 7);
	st16(o + 2, port);
	st16(o + 4, 8 + size);
	st16(o + 6, 0);
	return o + 8;
}

void cmd_net_send(const char *a, u32 len)
{
	struct nctx c;
	u32 ip;
	u64 port, count, size;
	struct vdev *d = udp_setup("net-send", a, len, &c, &ip, &port, &count, &size);
	if (!d)
		return;
	for (u64 k = 0; k < count && !c.err; k++) {
		int s = tx_slot(&c);
		if (s < 0)
			break;
		payload(udp_frame(d, s, c.peer, ip, (u32)port, (u32)size), (u32)size, (u32)k);
		tx_queue(&c, s, 42 + (u32)size, 1);
		rx_poll(&c);
	}
	tx_drain(&c);
	if (net_err(&c))
		return;
	line_begin();
	ps("PROBE-OK net-send net");
	pdec(d->num);
	ps(" sent=");
	pdec(count);
	line_end();
}

void cmd_net_blast(const char *a, u32 len)
{
	struct nctx c;
	u32 ip;
	u64 port, count, size;
	struct vdev *d = udp_setup("net-blast", a, len, &c, &ip, &port, &count, &size);
	if (!d)
		return;
	struct vq *tq = &d->q[1];
	/* Every buffer holds a complete datagram (payload of datagram 0); per datagram only
	 * the first 4 payload bytes (its number) change. */
	tx_drain(&c);
	if (net_err(&c))
		return;
	u32 flen = 42 + (u32)size;
	for (u32 s = 0; s < d->ntx; s++) {
		payload(udp_frame(d, (int)s, c.peer, ip, (u32)port, (u32)size), (u32)size, 0);
		u8 *f = frame(d, (int)s);
		for (u32 i = flen; i < 60; i++)
			f[i] = 0;
		tq->desc[s].len = HDR + (flen < 60 ? 60 : flen);
	}
	u32 kb = size < 4 ? (u32)size : 4;
	line_begin();
	ps("PROBE-BENCH-START net");
	pdec(d->num);
	line_end();
	u64 k = 0;
	while (k < count) {
		tx_reap(&c);
		u32 added = 0;
		while (d->ntxfree && k < count) {
			u32 s = d->txfree[--d->ntxfree];
			d->txbusy[s] = 1;
			u8 *p = frame(d, (int)s) + 42;
			for (u32 i = 0; i < kb; i++)
				p[i] = (u8)(k >> (8 * i));
			vq_add(tq, (u16)s);
			k++;
			added++;
		}
		if (added) {
			vq_kick(d, 1);
			c.tx += added;
		}
		rx_poll(&c);
		if (c.err)
			break;
		if (!d->ntxfree && k < count) {
			u32 id, l;
			int r = vq_wait(d, tq, &id, &l, WAIT_TICKS);
			if (r <= 0) {
				c.err = r ? -2 : -1;
				break;
			}
			tq->used_idx--;
		}
	}
	tx_drain(&c);
	if (net_err(&c))
		return;
	line_begin();
	ps("PROBE-BENCH-END net");
	pdec(d->num);
	ps(" frames=");
	pdec(count);
	ps(" bytes=");
	pdec(count * size);
	line_end();
}
