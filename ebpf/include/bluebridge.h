/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Constants and map layouts shared by the XDP programs and their Rust loader. build.rs turns
 * every `#define BB_* <integer>` line below into a Rust constant, so this is the one place these
 * numbers live. Map keys and values are mirrored in Rust as #[repr(C)] structs with a
 * compile-time size check.
 */
#ifndef BLUEBRIDGE_H
#define BLUEBRIDGE_H

/* The BlueBridge UDP port (docs/protocol.md §2.3); must equal bluebridge_proto::UDP_PORT. */
#define BB_UDP_PORT 47872

/* Capacity of the maps. */
#define BB_MAX_QUEUES 64
#define BB_MAX_PREFIXES 256

/* steer.bpf.c counters: index into the per-CPU `steer_counters` array. */
#define BB_STEER_REDIRECTED 0     /* ours, sent to the AF_XDP socket of the RX queue */
#define BB_STEER_PASS_NOT_IPV6 1  /* EtherType is not IPv6 */
#define BB_STEER_PASS_NOT_UDP 2   /* IPv6 whose next header is not UDP */
#define BB_STEER_PASS_PORT 3      /* UDP, but neither port is BlueBridge's */
#define BB_STEER_PASS_PREFIX 4    /* BlueBridge port, destination not in our prefixes */
#define BB_STEER_MALFORMED 5      /* headers cut short; passed to the kernel, which drops it */
#define BB_STEER_NO_SOCKET 6      /* ours, but no AF_XDP socket on this RX queue; passed */
#define BB_STEER_NR 7

/* Key of the `prefixes` LPM trie: the kernel's struct bpf_lpm_trie_key with an IPv6 address. */
struct bb_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

#endif
