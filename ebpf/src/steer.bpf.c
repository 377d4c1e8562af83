/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * steer: the server's (and client's) XDP program. A frame that is IPv6/UDP with the BlueBridge
 * port on either side and whose destination lies in one of this host's prefixes goes to the
 * AF_XDP socket of its RX queue; everything else passes to the kernel untouched.
 *
 * Section "xdp.frags": the program accepts multi-buffer frames (a whole page in one jumbo
 * frame). Only the first buffer is linear, and all headers we look at (62 bytes) are in it.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "bluebridge.h"

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
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6;
	struct udphdr *udp;
	struct bb_lpm_key key;
	__u32 queue;

	if ((void *)(eth + 1) > data_end)
		return count(BB_STEER_MALFORMED, XDP_PASS);
	if (eth->h_proto != bpf_htons(ETH_P_IPV6))
		return count(BB_STEER_PASS_NOT_IPV6, XDP_PASS);

	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end)
		return count(BB_STEER_MALFORMED, XDP_PASS);
	if (ip6->nexthdr != IPPROTO_UDP)
		return count(BB_STEER_PASS_NOT_UDP, XDP_PASS);

	udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > data_end)
		return count(BB_STEER_MALFORMED, XDP_PASS);
	/* Requests go to the port, replies come from it: a host that is both sees both. */
	if (udp->dest != bpf_htons(BB_UDP_PORT) && udp->source != bpf_htons(BB_UDP_PORT))
		return count(BB_STEER_PASS_PORT, XDP_PASS);

	key.prefixlen = 128;
	__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
	if (!bpf_map_lookup_elem(&prefixes, &key))
		return count(BB_STEER_PASS_PREFIX, XDP_PASS);

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
