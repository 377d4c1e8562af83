/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * steer: the server's (and client's) XDP program. A frame that is IPv6/UDP with the BlueBridge
 * port on either side and whose destination lies in one of this host's prefixes goes to the
 * AF_XDP socket of its RX queue; everything else passes to the kernel untouched. In the bounce
 * mode (a benchmark baseline) a frame of ours goes straight back with XDP_TX instead.
 *
 * The fast READ: an INLINE READ of a whole page or of up to BB_FAST_RANGE_MAX bytes of one
 * (docs/protocol.md §6.1: the request is padded to its reply's size) whose page the server has
 * copied into the hot-page store is answered here, in place, with XDP_TX: the range is copied
 * from its slot under the slot's seqlock, the headers are turned into the reply's and the UDP
 * checksum is made from the slot's data sum (a whole page) or the range's.
 * Anything this program cannot answer exactly as the server would goes to the socket.
 *
 * Section "xdp.frags": the program accepts multi-buffer frames (a whole page in one jumbo
 * frame). Only the first buffer is linear, and all headers we look at (62 bytes) are in it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "bluebridge.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, BB_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, BB_MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bb_lpm_key);
	__type(value, __u32);
} prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BB_STEER_NR);
	__type(key, __u32);
	__type(value, __u64);
} steer_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} own_mac SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} steer_mode SEC(".maps");

/* The hot-page store: slots the server (which maps this array) fills with copies of hot
 * pages, and the index from a page's address to its slot. Sizes are set at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bb_hot_slot);
} hot_slots SEC(".maps");

struct bb_hot_key {
	__u8 addr[BB_HOT_KEY_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct bb_hot_key);
	__type(value, __u32);
} hot_index SEC(".maps");

/* A page of zeros: what a torn copy's padding is put back to before the frame goes to the
 * socket (whose checksum covers the padding). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u8[BB_PAGE_SIZE]);
} zero_page SEC(".maps");

/* The BlueBridge header (docs/protocol.md §2.4) as it lies in the frame. */
struct bb_hdr {
	__u8 version;
	__u8 flags;
	__be16 status;
	__be16 item;
	__be16 count;
	__be64 request_id;
	__be16 offset;
	__be16 length;
	__be16 seg_max;
	__be16 reserved;
	__be64 lease;
	__be64 operand0;
	__be64 operand1;
} __attribute__((packed));

_Static_assert(sizeof(struct bb_hdr) == BB_HEADER_LEN, "bb_hdr size");

/* The READs answered here: a whole page, or a range of at most BB_FAST_RANGE_MAX bytes;
 * the request padded to the reply's size. */
#define FAST_DATA_OFF (BB_HEADER_OFFSET + BB_HEADER_LEN)

#define READ_ONCE_U32(x) (*(volatile __u32 *)&(x))

static __always_inline __u64 mac_u64(const unsigned char *m)
{
	return (__u64)m[0] << 40 | (__u64)m[1] << 32 | (__u64)m[2] << 24 |
	       (__u64)m[3] << 16 | (__u64)m[4] << 8 | (__u64)m[5];
}

/* Sources nobody can answer: multicast (ff00::/8), unspecified (::), loopback (::1). */
static __always_inline int unanswerable_source(const struct ipv6hdr *ip6)
{
	const __u32 *w = (const __u32 *)&ip6->saddr;

	if ((w[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000))
		return 1;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && (w[3] == 0 || w[3] == bpf_htonl(1));
}

static __always_inline int count(__u32 reason, int action)
{
	__u64 *c = bpf_map_lookup_elem(&steer_counters, &reason);

	if (c)
		*c += 1;
	return action;
}

static __always_inline int same16(const void *a, const void *b)
{
	const __u64 *x = a, *y = b;

	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline __u32 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

/* The ones' complement sum (folded, not inverted) of a fast READ frame's UDP checksum input
 * but its page bytes: the IPv6 pseudo-header, the UDP header and the BlueBridge header, plus
 * `seed` (the page bytes' sum). */
static __always_inline __u32 sum_headers(struct ipv6hdr *ip6, struct udphdr *udp, __u32 seed)
{
	__be32 pseudo[2] = { bpf_htonl(bpf_ntohs(udp->len)), bpf_htonl(IPPROTO_UDP) };
	__s64 s;

	s = bpf_csum_diff(0, 0, (__be32 *)&ip6->saddr, 32, seed);
	if (s < 0)
		return 0;
	s = bpf_csum_diff(0, 0, pseudo, sizeof(pseudo), (__u32)s);
	if (s < 0)
		return 0;
	s = bpf_csum_diff(0, 0, (__be32 *)udp, 8 + BB_HEADER_LEN, (__u32)s);
	if (s < 0)
		return 0;
	return fold((__u32)s);
}

/* `v`, as a value the verifier does not link to `v`: what a test of it teaches the verifier
 * stays with the copy. The pieces below test the bits of a length; learnt on the length
 * itself, every combination of bits would be a state of its own (2^10 of them, a second per
 * program load); learnt on the copy, they are dead once tested and the states merge. */
static __always_inline __u32 unlinked(__u32 v)
{
	__u32 zero = 0;

	barrier_var(zero);
	return v ^ zero;
}

/* Copies the slot's bytes [off, off + len) over the padding (len ≤ BB_FAST_RANGE_MAX) and
 * sets *sum to their ones' complement sum (folded, as csum_partial counts it). In pieces of
 * decreasing powers of two, so every access has a constant size the verifier can check and
 * every piece starts at an even place of the data. 0, or -1 if a piece could not be copied.
 * A global function: the verifier checks it once, on its own, not once per path that
 * reaches it. */
__noinline int bb_copy_range(struct xdp_md *ctx, struct bb_hot_slot *s, __u32 off, __u32 len,
			     __u32 *sum)
{
	__u32 acc = 0, bits = unlinked(len);
	int k;

	if (!s || !sum || len > BB_FAST_RANGE_MAX)
		return -1;

#pragma unroll
	for (k = 9; k >= 0; k--) {
		/* The larger pieces come first: this one starts where they end. Computed from
		 * `len` alone, not counted up along the way, so the verifier's states at each
		 * piece do not depend on which pieces came before (they would multiply). */
		__u32 size = 1U << k, at = len & ~((size << 1) - 1);
		__u64 pos = (__u64)off + at; /* 64 bits: checked and used in one register */
		__s64 r;

		if (!(bits & size))
			continue;
		if (pos > BB_PAGE_SIZE - size)
			return -1;
		/* A pointer made from `pos` from here on carries the bounds just checked (the
		 * verifier does not give them to one the compiler made before). */
		barrier_var(pos);
		if (bpf_xdp_store_bytes(ctx, FAST_DATA_OFF + at, &s->data[pos], size))
			return -1;
		if (size >= 4) {
			r = bpf_csum_diff(0, 0, (__be32 *)&s->data[pos], size, acc);
			if (r < 0)
				return -1;
			acc = fold((__u32)r);
		} else if (size == 2) {
			acc = fold(acc + (s->data[pos] | (__u32)s->data[pos + 1] << 8));
		} else {
			acc = fold(acc + s->data[pos]); /* a last odd byte: the low one in memory order */
		}
	}
	*sum = acc;
	return 0;
}

/* Writes `len` (≤ BB_FAST_RANGE_MAX) zeros over the padding, in the same pieces. */
static __always_inline int zero_range(struct xdp_md *ctx, void *zeros, __u32 len)
{
	__u32 bits = unlinked(len);
	int k;

#pragma unroll
	for (k = 9; k >= 0; k--) {
		__u32 size = 1U << k, at = len & ~((size << 1) - 1);

		if (!(bits & size))
			continue;
		if (bpf_xdp_store_bytes(ctx, FAST_DATA_OFF + at, zeros, size))
			return -1;
	}
	return 0;
}

/* An INLINE READ of a page in the hot store, answered with XDP_TX; -1 for a frame that goes
 * on to the socket (every INLINE READ is counted once: served, missed, torn or passed). */
static __always_inline int fast_read(struct xdp_md *ctx, struct bb_headers *h)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = h->ip6;
	struct udphdr *udp = h->udp;
	struct bb_hdr *bb = (void *)(udp + 1);
	struct bb_hot_key key = {};
	struct bb_hot_slot *s;
	__u32 *slot, seq, sum = 0, zero = 0, outcome = BB_STEER_FAST_TORN, off, len;
	__u16 check;
	void *zeros;
	int i, copied = 0, whole;

	if ((void *)(bb + 1) > data_end)
		return -1; /* not even a header: the socket counts it */
	if (ip6->daddr.s6_addr[14] != BB_OP_READ || !(bb->flags & BB_FLAG_INLINE) ||
	    (bb->flags & BB_FLAG_REPLY) || udp->dest != bpf_htons(BB_UDP_PORT))
		return -1;
	/* What the server would refuse or answer otherwise (segments, an error) is its to judge. */
	off = bpf_ntohs(bb->offset);
	len = bpf_ntohs(bb->length);
	whole = off == 0 && len == BB_PAGE_SIZE;
	if (bb->version != BB_VERSION || bb->status || bb->count != bpf_htons(1) ||
	    !(whole || (len >= 1 && len <= BB_FAST_RANGE_MAX && off + len <= BB_PAGE_SIZE)) ||
	    (bb->seg_max && bpf_ntohs(bb->seg_max) < len) ||
	    bpf_ntohs(udp->len) != 8 + BB_HEADER_LEN + len || ip6->payload_len != udp->len ||
	    bpf_xdp_get_buff_len(ctx) != FAST_DATA_OFF + len)
		return count(BB_STEER_FAST_PASSED, -1);

	__builtin_memcpy(key.addr, &ip6->daddr, 14);
	slot = bpf_map_lookup_elem(&hot_index, &key);
	if (!slot)
		return count(BB_STEER_FAST_MISSED, -1);
	s = bpf_map_lookup_elem(&hot_slots, slot);
	if (!s)
		return count(BB_STEER_FAST_MISSED, -1);
	/* The request's checksum, its padding taken as the zeros it must be: a frame that does
	 * not verify so (damaged, padded with anything else, or with the invalid checksum 0) is
	 * the socket's to judge. */
	if (!udp->check || sum_headers(ip6, udp, 0) != 0xffff)
		return count(BB_STEER_FAST_PASSED, -1);

	for (i = 0; i < 2; i++) {
		seq = READ_ONCE_U32(s->seq);
		if (seq & 1)
			continue; /* being written */
		if (!(s->flags & BB_HOT_VALID) || !same16(s->key, key.addr)) {
			outcome = BB_STEER_FAST_MISSED; /* given up while we looked */
			break;
		}
		if (!(s->flags & BB_HOT_SHARED) && !same16(s->owner, &ip6->saddr)) {
			outcome = BB_STEER_FAST_PASSED; /* the server answers FORBIDDEN */
			break;
		}
		copied = 1;
		if (whole) {
			sum = s->sum; /* the server keeps the whole page's */
			if (bpf_xdp_store_bytes(ctx, FAST_DATA_OFF, s->data, BB_PAGE_SIZE)) {
				outcome = BB_STEER_FAST_PASSED;
				break;
			}
		} else if (bb_copy_range(ctx, s, off, len, &sum)) {
			outcome = BB_STEER_FAST_PASSED;
			break;
		}
		if (READ_ONCE_U32(s->seq) == seq)
			goto serve;
	}
	/* Not served after a copy (torn twice, or the slot changed hands between the tries): the
	 * padding goes back to zeros so the request still verifies at the socket. */
	if (copied) {
		zeros = bpf_map_lookup_elem(&zero_page, &zero);
		if (!zeros || (whole ? bpf_xdp_store_bytes(ctx, FAST_DATA_OFF, zeros, BB_PAGE_SIZE)
				     : zero_range(ctx, zeros, len)))
			return count(BB_STEER_MALFORMED, XDP_DROP);
	}
	return count(outcome, -1);

serve:
	__sync_fetch_and_add(&s->hits, 1);
	/* The reply header the server would send: REPLY (and INLINE: answered here), the request's
	 * id, item, count and range, everything else 0. */
	bb->flags = BB_FLAG_REPLY | BB_FLAG_INLINE;
	bb->seg_max = 0;
	bb->reserved = 0;
	bb->lease = 0;
	bb->operand0 = 0;
	bb->operand1 = 0;
	bb_swap_endpoints(h->eth, ip6, udp);
	ip6->saddr.s6_addr[15] = 0; /* replies carry op flags 0 */
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->hop_limit = 64;
	udp->check = 0;
	check = ~sum_headers(ip6, udp, sum) & 0xffff;
	udp->check = check ? check : 0xffff;
	return count(BB_STEER_FAST_SERVED, XDP_TX);
}

static __always_inline int steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bb_headers h;
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	struct bb_lpm_key key;
	__u32 queue;

	/* Requests go to the port, replies come from it: a host that is both sees both. */
	switch (bb_parse(data, data_end, &h)) {
	case BB_PARSED_OURS:
		break;
	case BB_PARSED_NOT_IPV6:
		return count(BB_STEER_PASS_NOT_IPV6, XDP_PASS);
	case BB_PARSED_NOT_UDP:
		return count(BB_STEER_PASS_NOT_UDP, XDP_PASS);
	case BB_PARSED_PORT:
		return count(BB_STEER_PASS_PORT, XDP_PASS);
	default:
		return count(BB_STEER_MALFORMED, XDP_PASS);
	}
	eth = h.eth;
	ip6 = h.ip6;

	key.prefixlen = 128;
	__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
	if (!bpf_map_lookup_elem(&prefixes, &key))
		return count(BB_STEER_PASS_PREFIX, XDP_PASS);

	/* Ours: a frame nobody may be answered for is dropped here, before any reply could be
	 * reflected at a third party (a forged multicast or loopback source, a multicast source
	 * MAC, a frame meant for another station's MAC). */
	if ((eth->h_source[0] & 1) || unanswerable_source(ip6))
		return count(BB_STEER_DROP_SOURCE, XDP_DROP);
	{
		__u32 zero = 0;
		__u64 *mine = bpf_map_lookup_elem(&own_mac, &zero);

		if (mine && *mine && (mac_u64(eth->h_dest) | 1ULL << BB_OWN_MAC_SET_BIT) != *mine)
			return count(BB_STEER_DROP_MAC, XDP_DROP);
	}

	{
		__u32 zero = 0;
		__u32 *mode = bpf_map_lookup_elem(&steer_mode, &zero);

		if (mode && (*mode & BB_STEER_MODE_BOUNCE)) {
			bb_swap_endpoints(eth, ip6, h.udp);
			return count(BB_STEER_BOUNCED, XDP_TX);
		}
	}

	{
		int fast = fast_read(ctx, &h);

		if (fast >= 0)
			return fast;
	}

	queue = ctx->rx_queue_index;
	/* Looked up first so a missing socket is counted; redirect_map would pass silently. */
	if (!bpf_map_lookup_elem(&xsks, &queue))
		return count(BB_STEER_NO_SOCKET, XDP_PASS);
	count(BB_STEER_REDIRECTED, 0);
	return bpf_redirect_map(&xsks, queue, XDP_PASS);
}

SEC("xdp.frags")
int bb_steer(struct xdp_md *ctx)
{
	return steer(ctx);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
