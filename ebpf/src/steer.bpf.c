/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * steer: the server's (and client's) XDP program. A frame that is IPv6/UDP with the BlueBridge
 * port on either side and whose destination lies in one of this host's prefixes goes to the
 * AF_XDP socket of its RX queue; everything else passes to the kernel untouched. In the bounce
 * mode (a benchmark baseline) a frame of ours goes straight back with XDP_TX instead.
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
