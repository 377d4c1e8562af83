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
#define BB_STEER_DROP_SOURCE 7    /* ours, from a multicast/unspecified/loopback address or a
                                     multicast source MAC: dropped (no reflection) */
#define BB_STEER_DROP_MAC 8       /* ours, but sent to another MAC than this interface's */
#define BB_STEER_BOUNCED 9        /* ours, bounced back with XDP_TX (the bounce mode) */
/* The fast READ (an INLINE READ answered in XDP from the hot-page store); every INLINE READ
 * lands in exactly one of these four. */
#define BB_STEER_FAST_SERVED 10   /* answered with XDP_TX from a hot slot */
#define BB_STEER_FAST_MISSED 11   /* its page is not in the hot store: to the socket */
#define BB_STEER_FAST_TORN 12     /* the slot changed under both copies (seqlock): to the socket */
#define BB_STEER_FAST_PASSED 13   /* hot, but not servable here (range, seg_max, owner, checksum,
                                     lengths, version): to the socket, which judges it */
#define BB_STEER_NR 14

/* steer.bpf.c `steer_mode`: one __u32 of flags. BB_STEER_MODE_BOUNCE: instead of going to a
 * socket, every frame of ours goes back out of the port it came in on, endpoints swapped
 * (MACs, addresses, ports; the UDP checksum stays valid), unparsed: the floor of the path,
 * measured by `bluebridge-server --xdp-bounce` (a benchmark baseline). */
#define BB_STEER_MODE_BOUNCE 1

/* steer.bpf.c `own_mac`: one __u64, the interface's MAC in the low 48 bits (big-endian byte
 * order, first byte highest) with bit BB_OWN_MAC_SET_BIT set; 0 while not set (no destination
 * MAC check). */
#define BB_OWN_MAC_SET_BIT 48

/* tor.bpf.c (the software top-of-rack switch): capacities. */
#define BB_TOR_MAX_ROUTES 1048576   /* host /48s, page-range and single-page /112 routes */
#define BB_TOR_MAX_ROUTE_IDS 65536  /* per-route counters are kept for ids below this */
#define BB_TOR_MAX_PORTS 256
#define BB_TOR_MAX_SOURCES 4096     /* allowed source prefixes, all ports together */
#define BB_TOR_HOT_PAGES 65536      /* per-page counters kept (least recently used evicted) */
#define BB_TOR_FREED_RING 65536     /* bytes of the ring of freed pages read by the controller */

/* The FREE opcode (byte 14 of an address; docs/protocol.md §4): the switch reports pages whose
 * FREE succeeded. */
#define BB_OP_FREE 80
/* The coherence opcodes (docs/protocol.md §5.18): requests GET_SHARED .. RENEW, and the REVOKE
 * notice a page's home sends from the page's address. The switch counts both per page. */
#define BB_OP_GET_SHARED 160
#define BB_OP_RENEW 163
#define BB_OP_REVOKE 164

/* tor.bpf.c counters: index into the per-CPU `tor_counters` array. */
#define BB_TOR_FORWARDED 0        /* routed and redirected out of its egress port */
#define BB_TOR_NO_ROUTE 1         /* BlueBridge, but no route for the destination: dropped */
#define BB_TOR_SPOOFED 2          /* source outside every prefix of the ingress port: dropped */
#define BB_TOR_OTHER_DROPPED 3    /* not BlueBridge (not IPv6/UDP on our port): dropped */
#define BB_TOR_OTHER_PASSED 4     /* not BlueBridge: passed to the switch's kernel (config) */
#define BB_TOR_MALFORMED 5        /* headers cut short: dropped */
#define BB_TOR_HOP_LIMIT 6        /* hop limit exhausted: dropped */
#define BB_TOR_NO_PORT 7          /* the route's egress port is not in the device map */
#define BB_TOR_REJECTED 8         /* a request to a withdrawn host: bounced as UNREACHABLE */
#define BB_TOR_FREED_LOST 9       /* a freed-page report lost: the `freed` ring buffer was full */
#define BB_TOR_NR 10

/* `tor_config` entries. */
#define BB_TOR_CONFIG_FLAGS 0
#define BB_TOR_CONFIG_CONTROLLER 1
#define BB_TOR_CONFIG_NR 2

/* `tor_config` flags (entry BB_TOR_CONFIG_FLAGS). */
#define BB_TOR_PASS_OTHER 1       /* pass non-BlueBridge frames to the kernel instead of dropping */

/* `bb_tor_route.flags`. */
#define BB_TOR_ROUTE_REJECT 1     /* the host is down: answer requests with UNREACHABLE */

/* BlueBridge header bits the switch writes when it answers itself (docs/protocol.md). */
#define BB_HEADER_OFFSET 62       /* Ethernet 14 + IPv6 40 + UDP 8 */
#define BB_HEADER_LEN 48
#define BB_VERSION 1
#define BB_FLAG_REPLY 1
#define BB_FLAG_INLINE 16         /* READ padded to its reply's size (docs/protocol.md §6.1) */
#define BB_OP_READ 32
#define BB_PAGE_SIZE 4096
#define BB_FAST_RANGE_MAX 512     /* longest range (other than a whole page) the fast READ serves */
#define BB_STATUS_UNREACHABLE 17

/* The hot-page store (steer.bpf.c `hot_slots`, BPF_F_MMAPABLE, mapped by the server too):
 * copies of hot pages the fast READ answers from, and `hot_index`, page address → slot. The
 * server writes a slot under its seqlock: `seq` odd while it changes (XDP passes the READ to
 * the socket), even when stable; XDP reads `seq` before and after copying and serves only
 * if both agree and are even. */
#define BB_HOT_VALID 1            /* the slot holds the page `key` names */
#define BB_HOT_SHARED 2           /* any client may read it (else only `owner`) */
#define BB_HOT_SLOT_SIZE 4160
#define BB_HOT_SLOT_OFF_FLAGS 4
#define BB_HOT_SLOT_OFF_SUM 8
#define BB_HOT_SLOT_OFF_HITS 16
#define BB_HOT_SLOT_OFF_KEY 24
#define BB_HOT_SLOT_OFF_OWNER 40
#define BB_HOT_SLOT_OFF_DATA 64
#define BB_HOT_KEY_SIZE 16

struct bb_hot_slot {
	__u32 seq;          /* seqlock: odd while the server writes the slot */
	__u32 flags;        /* BB_HOT_* */
	__u32 sum;          /* ones' complement sum of `data` in 16-bit words of host byte order
			       (what csum_partial computes), folded to 16 bits */
	__u32 reserved;
	__u64 hits;         /* READs served from this slot (XDP adds, the server reads) */
	__u8 key[16];       /* address bytes 0..14 of the page (prefix, host, handle); 0, 0 */
	__u8 owner[16];     /* the only client that may read it, unless BB_HOT_SHARED */
	__u64 reserved2[1];
	__u8 data[4096];
};

/* A route: where frames for a prefix go. */
struct bb_tor_route {
	__u32 ifindex;      /* egress port */
	__u32 route_id;     /* index of its counters (>= BB_TOR_MAX_ROUTE_IDS: not counted) */
	__u8 dst_mac[6];    /* the next hop behind that port (the host) */
	__u8 src_mac[6];    /* the egress port's own MAC */
	__u32 flags;        /* BB_TOR_ROUTE_* */
};

/* The layouts the Rust loader mirrors (ebpf/src/layout.rs asserts the same numbers on its
 * #[repr(C)] structs; the static asserts below hold the C side to them). */
#define BB_TOR_ROUTE_SIZE 24
#define BB_TOR_ROUTE_OFF_ROUTE_ID 4
#define BB_TOR_ROUTE_OFF_DST_MAC 8
#define BB_TOR_ROUTE_OFF_SRC_MAC 14
#define BB_TOR_ROUTE_OFF_FLAGS 20
#define BB_TOR_SOURCE_KEY_SIZE 24
#define BB_TOR_SOURCE_KEY_OFF_IFINDEX 4
#define BB_TOR_SOURCE_KEY_OFF_ADDR 8
#define BB_TOR_STATS_SIZE 16
#define BB_TOR_PAGE_STATS_SIZE 24
#define BB_LPM_KEY_SIZE 20
#define BB_LPM_KEY_OFF_ADDR 4
_Static_assert(sizeof(struct bb_tor_route) == BB_TOR_ROUTE_SIZE, "bb_tor_route size");
_Static_assert(sizeof(struct bb_hot_slot) == BB_HOT_SLOT_SIZE, "bb_hot_slot size");
_Static_assert(__builtin_offsetof(struct bb_hot_slot, flags) == BB_HOT_SLOT_OFF_FLAGS, "flags");
_Static_assert(__builtin_offsetof(struct bb_hot_slot, sum) == BB_HOT_SLOT_OFF_SUM, "sum");
_Static_assert(__builtin_offsetof(struct bb_hot_slot, hits) == BB_HOT_SLOT_OFF_HITS, "hits");
_Static_assert(__builtin_offsetof(struct bb_hot_slot, key) == BB_HOT_SLOT_OFF_KEY, "key");
_Static_assert(__builtin_offsetof(struct bb_hot_slot, owner) == BB_HOT_SLOT_OFF_OWNER, "owner");
_Static_assert(__builtin_offsetof(struct bb_hot_slot, data) == BB_HOT_SLOT_OFF_DATA, "data");
_Static_assert(__builtin_offsetof(struct bb_tor_route, route_id) == BB_TOR_ROUTE_OFF_ROUTE_ID, "route_id");
_Static_assert(__builtin_offsetof(struct bb_tor_route, dst_mac) == BB_TOR_ROUTE_OFF_DST_MAC, "dst_mac");
_Static_assert(__builtin_offsetof(struct bb_tor_route, src_mac) == BB_TOR_ROUTE_OFF_SRC_MAC, "src_mac");
_Static_assert(__builtin_offsetof(struct bb_tor_route, flags) == BB_TOR_ROUTE_OFF_FLAGS, "flags");

/* Key of the `sources` LPM trie: the ingress port, then the source address. A port's allowed
 * prefix P/len is stored with prefixlen 32 + len; a frame is looked up with 160. */
struct bb_tor_source_key {
	__u32 prefixlen;
	__u32 ifindex;      /* big-endian, so it is the most significant part of the key */
	__u8 addr[16];
};

/* Counters of a route or a port. */
struct bb_tor_stats {
	__u64 packets;
	__u64 bytes;
};

/* Counters of a page: requests to it, and its coherence traffic (GET_SHARED, GET_EXCLUSIVE,
 * PUT, RENEW to it; REVOKE notices from it). */
struct bb_tor_page_stats {
	__u64 packets;
	__u64 bytes;
	__u64 coherence;
};

/* Key of the `prefixes` LPM trie: the kernel's struct bpf_lpm_trie_key with an IPv6 address. */
struct bb_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

_Static_assert(sizeof(struct bb_tor_source_key) == BB_TOR_SOURCE_KEY_SIZE, "source key size");
_Static_assert(__builtin_offsetof(struct bb_tor_source_key, ifindex) == BB_TOR_SOURCE_KEY_OFF_IFINDEX, "ifindex");
_Static_assert(__builtin_offsetof(struct bb_tor_source_key, addr) == BB_TOR_SOURCE_KEY_OFF_ADDR, "addr");
_Static_assert(sizeof(struct bb_tor_stats) == BB_TOR_STATS_SIZE, "stats size");
_Static_assert(sizeof(struct bb_tor_page_stats) == BB_TOR_PAGE_STATS_SIZE, "page stats size");
_Static_assert(sizeof(struct bb_lpm_key) == BB_LPM_KEY_SIZE, "lpm key size");
_Static_assert(__builtin_offsetof(struct bb_lpm_key, addr) == BB_LPM_KEY_OFF_ADDR, "lpm addr");

#endif
