//! The 2017 prototype's failure, reproduced and cured. `cargo xtask ndp` runs this with the
//! tables printed.
//!
//! Prototype: kernel UDP, every page address on-link, an NDP proxy answering for all of them —
//! the client's neighbour table gains one entry per page address until it overflows
//! (gc_thresh3, 1024 by default) and requests to new addresses fail.
//! BlueBridge: AF_XDP on both ends, frames to the next hop's MAC — a million distinct page
//! addresses add no neighbour entry and lose no request.

use std::time::{Duration, Instant};

use bluebridge_client::{ClientError, Request};
use bluebridge_proto::{NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr};
use bluebridge_server::TransportKind;
use bluebridge_tests::{Rig, RigOptions, SERVER};

/// Distinct, non-zero handles (splitmix64 of a counter).
fn handle(i: u64) -> PageHandle {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    PageHandle::from_bits((z ^ (z >> 31)) | 1)
}

/// Sends one small READ to each of the page addresses `from..to` (32 in flight); returns
/// (answered by the server, failed). An answer is any reply — the handles are made up, so the
/// server says INVALID_HANDLE or STALE_HANDLE — because the question is whether the request
/// got through.
fn touch(rig: &mut Rig, from: u64, to: u64) -> (u64, u64) {
    let page = RemoteAddr::new(
        NetPrefix::DEFAULT,
        SERVER,
        PageHandle::NONE,
        Opcode::READ,
        OpFlags::NONE,
    );
    let (mut answered, mut failed, mut next, mut done) = (0, 0, from, from);
    while done < to {
        while next < to && rig.client.in_flight() < 32 {
            let addr = page.with_handle(handle(next));
            rig.client
                .submit(Request::new(Opcode::READ, addr).range(0, 64));
            next += 1;
        }
        while let Some(c) = rig.client.poll() {
            done += 1;
            match c.result {
                Ok(_) | Err(ClientError::InvalidHandle | ClientError::StaleHandle) => answered += 1,
                Err(_) => failed += 1,
            }
        }
    }
    (answered, failed)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn the_prototype_overflows_its_neighbour_table_and_bluebridge_does_not() {
    // Read in this (the initial) namespace: new namespaces start with the same default.
    let thresh =
        std::fs::read_to_string("/proc/sys/net/ipv6/neigh/default/gc_thresh3").unwrap_or_default();
    // --- the prototype's configuration ---
    let mut proto = Rig::new(&RigOptions {
        server_transport: TransportKind::Udp,
        client_udp: true,
        prototype_ndp: true,
        rto: Duration::from_millis(2),
        retries: 2,
        ..RigOptions::default()
    });
    println!(
        "\nThe prototype's configuration: kernel UDP, page addresses on-link, NDP proxy (gc_thresh3 = {}):",
        thresh.trim()
    );
    println!(
        "| distinct page addresses | client neighbour entries | requests answered | requests failed |"
    );
    println!("|---|---|---|---|");
    let mut touched = 0;
    let mut rows = Vec::new();
    for step in [1_000u64, 1_000, 3_000] {
        let (a, f) = touch(&mut proto, touched, touched + step);
        touched += step;
        let n = proto.pair.client_ns().neighbour_count().unwrap();
        println!("| {touched} | {n} | {a} | {f} |");
        rows.push((touched, n, a, f));
    }
    println!(
        "(NDP proxy answered {} solicitations)",
        proto
            .ndp
            .as_ref()
            .unwrap()
            .answered
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(proto);
    // The table grows with the pages touched...
    assert!(
        rows[0].1 >= 900,
        "one neighbour entry per page address: {rows:?}"
    );
    // ...until it is full, and then requests to new addresses fail.
    assert!(
        rows[2].3 > 0,
        "requests fail once the neighbour table is full: {rows:?}"
    );

    // --- BlueBridge ---
    let mut bb = Rig::new(&RigOptions::default());
    let before = (
        bb.pair.client_ns().neighbour_count().unwrap(),
        bb.pair.server_ns().neighbour_count().unwrap(),
    );
    let n = 1_000_000;
    let t = Instant::now();
    let (a, f) = touch(&mut bb, 0, n);
    let after = (
        bb.pair.client_ns().neighbour_count().unwrap(),
        bb.pair.server_ns().neighbour_count().unwrap(),
    );
    println!("\nBlueBridge: AF_XDP, frames to the next hop's MAC:");
    println!(
        "| distinct page addresses | neighbour entries client / server, before | after | requests answered | requests lost | time |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {} / {} | {} / {} | {a} | {f} | {:.1} s |",
        before.0,
        before.1,
        after.0,
        after.1,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(after, before, "no neighbour entry added");
    assert_eq!((a, f), (n, 0), "every request answered");
}
