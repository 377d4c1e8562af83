/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * tor: the software top-of-rack switch. Attached to every port of the switch namespace. A
 * BlueBridge frame (IPv6/UDP with the BlueBridge port on either side) is routed by longest-
 * prefix match on its destination address (host /48s, page-range and single-page /112 routes,
 * installed by the controller): its Ethernet header is rewritten for the egress port (the
 * host's MAC as destination, the port's as source), its hop limit decremented, and it leaves
 * through the device map. No neighbour table anywhere: routes carry the next hop's MAC.
 *
 * Dropped and counted: frames with no route, frames whose source address lies outside every
 * prefix assigned to their ingress port (anti-spoofing), exhausted hop limits, malformed
 * headers. Other traffic is dropped, or passed to the switch's kernel if configured; it is never
 * forwarded blindly.
 *
 * Section "xdp.frags": whole-page multi-buffer frames are forwarded as they are; all the
 * headers read or written (62 bytes) are in the first buffer.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "bluebridge.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, BB_TOR_MAX_ROUTES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bb_lpm_key);
	__type(value, struct bb_tor_route);
} routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, BB_TOR_MAX_SOURCES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bb_tor_source_key);
	__type(value, __u32);
} sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, BB_TOR_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BB_TOR_NR);
	__type(key, __u32);
	__type(value, __u64);
} tor_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BB_TOR_MAX_ROUTE_IDS);
	__type(key, __u32);
	__type(value, struct bb_tor_stats);
} route_stats SEC(".maps");

/* Per port (by ifindex): frames received and sent. Entries are created by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, BB_TOR_MAX_PORTS * 2);
	__type(key, __u64);     /* ifindex << 1 | 0 for rx, | 1 for tx */
	__type(value, struct bb_tor_stats);
} port_stats SEC(".maps");

/* Pages freed (a FREE answered OK passed through): their /112s, for the controller to
 * invalidate routes and tell clients. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, BB_TOR_FREED_RING);
} freed SEC(".maps");

/* Per page (the address with opcode and flags cleared: the page's /112): requests forwarded
 * to it, and its coherence traffic. The least recently used pages make room for new ones. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, BB_TOR_HOT_PAGES);
	__type(key, struct in6_addr);
	__type(value, struct bb_tor_page_stats);
} page_stats SEC(".maps");

/* Entry BB_TOR_CONFIG_FLAGS: BB_TOR_PASS_OTHER; entry BB_TOR_CONFIG_CONTROLLER: the
 * controller's port (its health checks pass through reject routes, so a host that comes back
 * can be seen). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BB_TOR_CONFIG_NR);
	__type(key, __u32);
	__type(value, __u32);
} tor_config SEC(".maps");

static __always_inline int count(__u32 reason, int action)
{
	__u64 *c = bpf_map_lookup_elem(&tor_counters, &reason);

	if (c)
		*c += 1;
	return action;
}

static __always_inline void add(struct bb_tor_stats *s, __u64 bytes)
{
	if (s) {
		s->packets += 1;
		s->bytes += bytes;
	}
}

/* Counts a frame about the page `addr` names: a request to it (`request`: packets and bytes)
 * and/or a coherence message about it. */
static __always_inline void count_page(const struct in6_addr *addr, __u64 bytes, int request,
				       int coherence)
{
	struct in6_addr page = *addr;
	struct bb_tor_page_stats *s;

	page.s6_addr[14] = 0;
	page.s6_addr[15] = 0;
	s = bpf_map_lookup_elem(&page_stats, &page);
	if (s) {
		if (request) {
			s->packets += 1;
			s->bytes += bytes;
		}
		s->coherence += coherence;
	} else {
		struct bb_tor_page_stats first = {
			.packets = request,
			.bytes = request ? bytes : 0,
			.coherence = coherence,
		};

		bpf_map_update_elem(&page_stats, &page, &first, BPF_NOEXIST);
	}
}

/* Whether an opcode byte is a coherence request (GET_SHARED, GET_EXCLUSIVE, PUT, RENEW). */
static __always_inline int coherence_op(__u8 op)
{
	return op >= BB_OP_GET_SHARED && op <= BB_OP_RENEW;
}

/* One's-complement checksum update for a 16-bit word changing from `old` to `new` (RFC 1624,
 * eqn. 3), all in network byte order. */
static __always_inline __u16 csum_replace(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check + (__u16)~old + new;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* Bounces a request for a withdrawn host back to its sender as an UNREACHABLE reply: Ethernet
 * and IPv6 addresses and UDP ports swapped (the checksum does not change), REPLY set and the
 * status written into the BlueBridge header (the checksum updated for those two words), the
 * payload kept. Replies and anything too short for a header are dropped. */
static __always_inline int reject(struct xdp_md *ctx, struct udphdr *udp)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u8 *bb = (__u8 *)data + BB_HEADER_OFFSET;
	__u16 old, new;

	if ((void *)(bb + 4) > data_end || (void *)(udp + 1) > data_end)
		return count(BB_TOR_MALFORMED, XDP_DROP);
	if (bb[1] & BB_FLAG_REPLY)
		return count(BB_TOR_NO_ROUTE, XDP_DROP);

	bb_swap_endpoints(eth, ip6, udp);
	ip6->hop_limit = 64;

	old = *(__u16 *)bb;
	bb[1] |= BB_FLAG_REPLY;
	new = *(__u16 *)bb;
	if (udp->check)
		udp->check = csum_replace(udp->check, old, new);
	old = *(__u16 *)(bb + 2);
	bb[2] = BB_STATUS_UNREACHABLE >> 8;
	bb[3] = BB_STATUS_UNREACHABLE & 0xff;
	new = *(__u16 *)(bb + 2);
	if (udp->check) {
		udp->check = csum_replace(udp->check, old, new);
		if (!udp->check)
			udp->check = 0xffff;
	}
	return count(BB_TOR_REJECTED, XDP_TX);
}

/* A reply from a page's FREE address with status OK: the page is gone; tell the controller. */
static __always_inline void report_free(void *data, void *data_end, struct ipv6hdr *ip6)
{
	__u8 *bb = (__u8 *)data + BB_HEADER_OFFSET;
	struct in6_addr *page;

	if ((void *)(bb + 4) > data_end)
		return;
	if (ip6->saddr.s6_addr[14] != BB_OP_FREE || !(bb[1] & BB_FLAG_REPLY) || bb[2] || bb[3])
		return;
	page = bpf_ringbuf_reserve(&freed, sizeof(*page), 0);
	if (!page) {
		/* The controller is behind: this report is lost (its page is found stale later). */
		count(BB_TOR_FREED_LOST, 0);
		return;
	}
	*page = ip6->saddr;
	page->s6_addr[14] = 0;
	page->s6_addr[15] = 0;
	bpf_ringbuf_submit(page, 0);
}

static __always_inline int from_controller(struct xdp_md *ctx)
{
	__u32 key = BB_TOR_CONFIG_CONTROLLER;
	__u32 *port = bpf_map_lookup_elem(&tor_config, &key);

	return port && *port && *port == ctx->ingress_ifindex;
}

static __always_inline int other(void)
{
	__u32 key = BB_TOR_CONFIG_FLAGS;
	__u32 *cfg = bpf_map_lookup_elem(&tor_config, &key);

	if (cfg && (*cfg & BB_TOR_PASS_OTHER))
		return count(BB_TOR_OTHER_PASSED, XDP_PASS);
	return count(BB_TOR_OTHER_DROPPED, XDP_DROP);
}

static __always_inline int forward(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bb_headers h;
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	struct udphdr *udp;
	struct bb_lpm_key dst;
	struct bb_tor_source_key src;
	struct bb_tor_route *r;
	__u64 len = bpf_xdp_get_buff_len(ctx);
	__u64 port_key;

	switch (bb_parse(data, data_end, &h)) {
	case BB_PARSED_OURS:
		break;
	case BB_PARSED_SHORT:
		return count(BB_TOR_MALFORMED, XDP_DROP);
	default:
		return other();
	}
	eth = h.eth;
	ip6 = h.ip6;
	udp = h.udp;

	port_key = (__u64)ctx->ingress_ifindex << 1;
	add(bpf_map_lookup_elem(&port_stats, &port_key), len);

	src.prefixlen = 160;
	src.ifindex = bpf_htonl(ctx->ingress_ifindex);
	__builtin_memcpy(src.addr, &ip6->saddr, sizeof(src.addr));
	if (!bpf_map_lookup_elem(&sources, &src))
		return count(BB_TOR_SPOOFED, XDP_DROP);

	dst.prefixlen = 128;
	__builtin_memcpy(dst.addr, &ip6->daddr, sizeof(dst.addr));
	r = bpf_map_lookup_elem(&routes, &dst);
	if (!r)
		return count(BB_TOR_NO_ROUTE, XDP_DROP);
	if ((r->flags & BB_TOR_ROUTE_REJECT) && !from_controller(ctx))
		return reject(ctx, udp);
	if (ip6->hop_limit <= 1)
		return count(BB_TOR_HOP_LIMIT, XDP_DROP);
	if (!bpf_map_lookup_elem(&tx_ports, &r->ifindex))
		return count(BB_TOR_NO_PORT, XDP_DROP);

	ip6->hop_limit -= 1;
	__builtin_memcpy(eth->h_dest, r->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, r->src_mac, ETH_ALEN);
	if (r->route_id < BB_TOR_MAX_ROUTE_IDS) {
		__u32 id = r->route_id;

		add(bpf_map_lookup_elem(&route_stats, &id), len);
	}
	port_key = ((__u64)r->ifindex << 1) | 1;
	add(bpf_map_lookup_elem(&port_stats, &port_key), len);
	if (udp->dest == bpf_htons(BB_UDP_PORT))
		count_page(&ip6->daddr, len, 1, coherence_op(ip6->daddr.s6_addr[14]));
	else if (ip6->saddr.s6_addr[14] == BB_OP_REVOKE)
		count_page(&ip6->saddr, len, 0, 1);
	else
		report_free(data, data_end, ip6);
	count(BB_TOR_FORWARDED, 0);
	return bpf_redirect_map(&tx_ports, r->ifindex, 0);
}

SEC("xdp.frags")
int bb_tor(struct xdp_md *ctx)
{
	return forward(ctx);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
