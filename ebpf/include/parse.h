/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * The header walk both XDP programs (steer.bpf.c, tor.bpf.c) share: Ethernet, IPv6 with no
 * extension header, UDP with the BlueBridge port on either side; and turning a frame around. One place decides what a
 * BlueBridge frame is, so the server's and the switch's programs cannot drift apart.
 */
#ifndef BLUEBRIDGE_PARSE_H
#define BLUEBRIDGE_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>

#include "bluebridge.h"

/* What bb_parse found. */
enum bb_parsed {
	BB_PARSED_OURS,      /* IPv6/UDP, BlueBridge port as source or destination */
	BB_PARSED_SHORT,     /* a header cut short */
	BB_PARSED_NOT_IPV6,  /* EtherType is not IPv6 */
	BB_PARSED_NOT_UDP,   /* next header is not UDP (extension headers included) */
	BB_PARSED_PORT,      /* UDP, neither port BlueBridge's */
};

struct bb_headers {
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	struct udphdr *udp;
};

static __always_inline enum bb_parsed bb_parse(void *data, void *data_end, struct bb_headers *h)
{
	h->eth = data;
	if ((void *)(h->eth + 1) > data_end)
		return BB_PARSED_SHORT;
	if (h->eth->h_proto != bpf_htons(ETH_P_IPV6))
		return BB_PARSED_NOT_IPV6;
	h->ip6 = (void *)(h->eth + 1);
	if ((void *)(h->ip6 + 1) > data_end)
		return BB_PARSED_SHORT;
	if (h->ip6->nexthdr != IPPROTO_UDP)
		return BB_PARSED_NOT_UDP;
	h->udp = (void *)(h->ip6 + 1);
	if ((void *)(h->udp + 1) > data_end)
		return BB_PARSED_SHORT;
	if (h->udp->dest != bpf_htons(BB_UDP_PORT) && h->udp->source != bpf_htons(BB_UDP_PORT))
		return BB_PARSED_PORT;
	return BB_PARSED_OURS;
}

/* Turns a frame around: MACs, IPv6 addresses and UDP ports swapped (the switch's UNREACHABLE
 * answer, the server's bounce mode). The UDP checksum stays valid: the pseudo-header's
 * addresses and the ports are summed, not ordered. The caller has checked the three headers
 * lie inside the frame (bb_parse). */
static __always_inline void bb_swap_endpoints(struct ethhdr *eth, struct ipv6hdr *ip6,
					      struct udphdr *udp)
{
	unsigned char mac[ETH_ALEN];
	struct in6_addr addr;
	__be16 port;

	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	addr = ip6->saddr;
	ip6->saddr = ip6->daddr;
	ip6->daddr = addr;
	port = udp->source;
	udp->source = udp->dest;
	udp->dest = port;
}

#endif
