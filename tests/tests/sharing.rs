//! Coherent shared regions across hosts (docs/protocol.md §5.18, docs/paging.md "Sharing"),
//! over real packets. In a 3-host rack around the XDP switch (one server, an AF_XDP client on
//! every host mapping the same pages): the litmus suite run many times with its forbidden
//! outcomes counted, a lock built from compare-and-swap in the mapped memory protecting a
//! counter, a parallel job checked byte for byte, and a sharer process killed with SIGKILL
//! (the writer waits only for its lease). Behind the impairment relay (loss, duplication,
//! reordering of requests and notices alike): the same outcomes. A home server restarted:
//! errors, never the new server's zeros for the old data.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use bluebridge_bench::dsm;
use bluebridge_client::region::{
    Coherence, HandlerCpu, OnClose, RegionStats, VolatileMemoryError, WriteVolatile,
};
use bluebridge_client::{AnyTransport, Client, ClientError, RegionOptions, RemoteRegion};
use bluebridge_proto::{HostId, PAGE_SIZE, RemoteAddr};
use bluebridge_switch::actions::migrate;
use bluebridge_tests::controlled::{ControlledRack, RackOptions};
use bluebridge_tests::{RackRig, Rig, RigOptions, SERVER, pair_client, rack_client_addr};
use bluebridge_topology::Impairment;

type Region = RemoteRegion<AnyTransport>;

fn shared_options() -> RegionOptions {
    RegionOptions {
        coherence: Coherence::Shared,
        // Three regions' handlers and three test threads share two CPUs.
        handler_cpu: HandlerCpu::Any,
        on_close: OnClose::Detach,
        ..RegionOptions::default()
    }
}

/// `f` run by every client at once, each with its own shared region over `addrs`; what each
/// returned, with its region's counters at the end.
fn share<R: Send>(
    clients: Vec<Client<AnyTransport>>,
    addrs: &[RemoteAddr],
    f: impl Fn(usize, &Region, &Barrier) -> R + Sync,
) -> Vec<(R, RegionStats)> {
    let barrier = Barrier::new(clients.len());
    std::thread::scope(|s| {
        let hosts: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, client)| {
                let (addrs, f, barrier) = (addrs.to_vec(), &f, &barrier);
                s.spawn(move || {
                    let region = RemoteRegion::attach(client, addrs, shared_options())
                        .expect("a shared region");
                    let r = f(i, &region, barrier);
                    let st = region.stats();
                    if let Some(e) = region.last_error() {
                        eprintln!("host {i}: last error {e}");
                    }
                    region.close().expect("closing");
                    (r, st)
                })
            })
            .collect();
        hosts
            .into_iter()
            .map(|h| h.join().expect("host thread"))
            .collect()
    })
}

/// Checks that no region met an error and that copies did move between hosts.
fn clean<R>(out: &[(R, RegionStats)]) {
    for (i, (_, st)) in out.iter().enumerate() {
        eprintln!("host {i}: {st:?}");
        assert_eq!((st.errors, st.lost_writes), (0, 0), "host {i}");
    }
    let revokes: u64 = out.iter().map(|(_, st)| st.revokes).sum();
    assert!(revokes > 0, "copies moved between hosts");
}

/// A 3-host rack with a server on host 0 and `pages` shared pages on it, allocated by host 0's
/// client (closed again: one AF_XDP client per link), then `f` on every host.
fn on_three_hosts<R: Send>(
    pages: usize,
    f: impl Fn(usize, &Region, &Barrier) -> R + Sync,
) -> Vec<R> {
    let rig = RackRig::new(3, &[0]);
    let addrs = rack_pages(&rig, pages);
    let clients = (0..3).map(|i| rig.client(i)).collect();
    let out = share(clients, &addrs, f);
    clean(&out);
    // The switch counted the pages' coherence traffic (requests to them, notices from them).
    let hot = rig
        .tor
        .hot_pages(1 << 16)
        .expect("the switch's page counters");
    let coherence: u64 = hot
        .iter()
        .filter(|(a, _)| {
            addrs
                .iter()
                .any(|p| p.to_ipv6().octets()[..14] == a.octets()[..14])
        })
        .map(|(_, t)| t.coherence)
        .sum();
    let revokes: u64 = out.iter().map(|(_, st)| st.revokes).sum();
    assert!(
        coherence >= revokes,
        "the switch saw {coherence} coherence messages for the shared pages, the regions answered {revokes} notices"
    );
    free_rack_pages(&rig, &addrs);
    out.into_iter().map(|(r, _)| r).collect()
}

/// Message passing (`runs`, pages 0..3), then the lock counter (`rounds` per host, pages
/// 3..5), on every client's shared region over `addrs`.
fn mp_then_lock(
    clients: Vec<Client<AnyTransport>>,
    addrs: &[RemoteAddr],
    runs: u64,
    rounds: u64,
) -> Vec<((dsm::Litmus, Option<u64>), RegionStats)> {
    share(clients, addrs, |host, region, barrier| {
        let w = region.as_atomic_words();
        let mp = dsm::message_passing(host, w, runs);
        barrier.wait();
        (
            mp,
            dsm::lock_counter(host, &w[3 * dsm::WORDS..], barrier, rounds),
        )
    })
}

/// No region erred, no message-passing run saw the flag before the data, and every host read
/// the counter's exact `total`.
fn check_mp_then_lock(out: &[((dsm::Litmus, Option<u64>), RegionStats)], total: u64, how: &str) {
    clean(out);
    let mp: u64 = out.iter().map(|o| o.0.0.forbidden).sum();
    assert_eq!(mp, 0, "message passing {how}");
    assert!(
        out.iter().all(|o| o.0.1 == Some(total)),
        "the exact total on every host {how}: {:?}",
        out.iter().map(|o| o.0.1).collect::<Vec<_>>()
    );
}

fn rack_pages(rig: &RackRig, pages: usize) -> Vec<RemoteAddr> {
    let server = HostId(rig.rack.hosts[0].host_id);
    let mut owner = rig.client(0);
    let mut addrs = Vec::new();
    while addrs.len() < pages {
        let n = (pages - addrs.len()).min(128) as u16;
        addrs.extend(owner.alloc_bulk(server, n, true).expect("shared pages"));
    }
    addrs
}

/// Every copy went back when the regions closed: the owner can free the pages.
fn free_rack_pages(rig: &RackRig, addrs: &[RemoteAddr]) {
    let failed = rig.client(0).free_all(addrs);
    assert!(failed.is_empty(), "freeing: {failed:?}");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn litmus_message_passing_and_write_ordering() {
    let out = on_three_hosts(3, |host, region, barrier| {
        let w = region.as_atomic_words();
        let mp = dsm::message_passing(host, w, 150);
        barrier.wait();
        (mp, dsm::write_write(host, w, barrier, 50))
    });
    let mp: u64 = out.iter().map(|o| o.0.forbidden).sum();
    assert_eq!(mp, 0, "message passing: the flag seen before the data");
    assert_eq!(out[2].0.runs, 150);
    let ww: Vec<Vec<u64>> = out.into_iter().map(|o| o.1).collect();
    assert_eq!(
        dsm::write_write_forbidden(&ww),
        0,
        "hosts disagree on a word's last write: {ww:x?}"
    );
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn litmus_store_and_load_buffering_never_show_forbidden_outcomes() {
    let out = on_three_hosts(2, |host, region, barrier| {
        dsm::store_and_load_buffering(host, region.as_atomic_words(), barrier, 100)
    });
    let sb = dsm::forbidden_runs(&out[1].0, &out[2].0);
    let lb = dsm::forbidden_runs(&out[1].1, &out[2].1);
    assert_eq!((sb, lb), (0, 0), "store buffering, load buffering");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_lock_in_shared_memory_protects_a_counter_across_hosts() {
    let out = on_three_hosts(2, |host, region, barrier| {
        dsm::lock_counter(host, region.as_atomic_words(), barrier, 100)
    });
    assert_eq!(out, [Some(300); 3], "every host reads the exact total");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_parallel_job_on_a_shared_array_is_whole_on_every_host() {
    const PER_HOST: usize = 12;
    let bad = on_three_hosts(3 * PER_HOST, |host, region, barrier| {
        let n = dsm::parallel_fill(host, 3, PER_HOST, region.as_atomic_words(), barrier);
        // The byte view agrees (its pages come in afresh after the others' writes). Volatile:
        // a shared region's bytes are not a plain slice's.
        let plain =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| region.as_slice().len()));
        assert!(
            plain.is_err(),
            "a plain slice of a shared region is refused"
        );
        let mut all = vec![0u8; region.len()];
        region.as_volatile().copy_to(&mut all[..]);
        n + (0..3 * PER_HOST * PAGE_SIZE)
            .filter(|&i| all[i] != dsm::cell(i / PAGE_SIZE, i % PAGE_SIZE))
            .count()
    });
    assert_eq!(bad, [0, 0, 0], "bytes that differ, per host");
}

/// A child process, killed if the test ends first.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn example(name: &str) -> PathBuf {
    bluebridge_tests::built(
        &format!("examples/{name}"),
        "`cargo build -p bluebridge-client --examples`",
    )
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_sharer_killed_with_sigkill_holds_up_a_writer_only_for_its_lease() {
    let rig = RackRig::new(3, &[0]);
    let addrs = rack_pages(&rig, 2);
    // Host 2: the shared_counter example adds 3 and exits (its copies go back at close);
    // then, again, takes a read copy of the counter's page and holds it.
    let h = &rig.rack.hosts[2];
    let list: Vec<String> = addrs.iter().map(|a| a.to_ipv6().to_string()).collect();
    let sharer = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &h.ns])
            .arg(example("shared_counter"))
            .args(["--iface", &h.client_if])
            .args(["--local", &rack_client_addr(HostId(h.host_id)).to_string()])
            .args([
                "--next-hop-mac",
                &bluebridge_topology::fmt_mac(h.client_port_mac),
            ])
            .args(["add", "--pages", &list.join(",")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let first = sharer(&["--times", "3"]).output().unwrap();
    assert!(first.status.success(), "{first:?}");
    let mut child = Child(
        sharer(&["--times", "0", "--hold"])
            .spawn()
            .expect("starting the shared_counter example"),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let started = Instant::now();
    loop {
        let Some(line) = lines.next().transpose().unwrap() else {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err);
            panic!("the example ended before holding a copy: {err}");
        };
        eprintln!("sharer: {line}");
        if line == "holding" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no read copy");
    }
    // SIGKILL: no close, no answers to notices, its copy stays in the home's directory.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed = Instant::now();
    let out = share(vec![rig.client(1)], &addrs, |_, region, _| {
        let counter = &region.as_atomic_words()[dsm::WORDS];
        let v = counter.fetch_add(1, SeqCst);
        (v, killed.elapsed())
    });
    let ((before, waited), st) = &out[0];
    eprintln!("the writer waited {waited:?} for the dead reader: {st:?}");
    assert_eq!(
        *before, 3,
        "the first sharer's increments were written back at its close"
    );
    assert!(
        st.recalls > 0,
        "the home made the writer wait for the reader"
    );
    assert!(
        *waited < Duration::from_millis(2500),
        "a dead reader held the writer up for {waited:?}, past its 1 s lease"
    );
    assert_eq!((st.errors, st.lost_writes), (0, 0));
    free_rack_pages(&rig, &addrs);
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn lost_duplicated_and_reordered_notices_change_no_outcome() {
    let o = RigOptions {
        relay_seed: Some(13),
        client_udp: true,
        ..RigOptions::default()
    };
    let mut rig = Rig::new(&o);
    let mut addrs = Vec::new();
    // Pages 0..3 for message passing, 3..5 for the lock and its counter.
    for _ in 0..5 {
        addrs.push(rig.client.alloc(SERVER, true).expect("a shared page"));
    }
    let relay = rig.pair.relay.as_ref().unwrap();
    relay.set(Impairment {
        loss: 0.05,
        duplicate: 0.05,
        reorder: 0.10,
        max_delay: Duration::from_millis(1),
    });
    // Three clients (kernel UDP, each its own port: three endpoints to the home).
    let clients = (0..3).map(|_| pair_client(&rig.pair, &o)).collect();
    let out = mp_then_lock(clients, &addrs, 40, 30);
    relay.set(Impairment::NONE);
    let back: Vec<u64> = relay.counters[1..]
        .iter()
        .map(|c| c.lost.load(SeqCst) + c.duplicated.load(SeqCst))
        .collect();
    eprintln!("server→client frames lost or duplicated: {back:?}");
    assert!(
        back[0] > 0,
        "the relay impaired the home's answers and notices"
    );
    check_mp_then_lock(&out, 90, "through a lossy link");
    // A GET the relay duplicated may reach the home after its region gave the copy back: the
    // home grants it again to a holder that holds nothing (docs/protocol.md, "Why every message
    // may be lost…"), and that closed region answers no notice, so the page is LEASE_HELD until
    // the copy lease (1 s) runs out. FREE waits for that, never longer.
    let start = Instant::now();
    let mut left = addrs;
    while !left.is_empty() {
        let failed = rig.client.free_all(&left);
        assert!(
            failed.iter().all(|(_, e)| *e == ClientError::LeaseHeld),
            "{failed:?}"
        );
        assert!(
            failed.is_empty() || start.elapsed() < Duration::from_secs(3),
            "still held 3 s after the regions closed: {failed:?}"
        );
        left = failed.into_iter().map(|(p, _)| p).collect();
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_restarted_home_gives_errors_never_the_new_servers_zeros() {
    let o = RigOptions {
        client_udp: true,
        ..RigOptions::default()
    };
    let mut rig = Rig::new(&o);
    let addrs = vec![
        rig.client.alloc(SERVER, true).unwrap(),
        rig.client.alloc(SERVER, true).unwrap(),
    ];
    let a = RemoteRegion::attach(
        pair_client(&rig.pair, &o),
        addrs.clone(),
        RegionOptions {
            on_error: Some(Box::new(|e| eprintln!("writer: {e}"))),
            ..shared_options()
        },
    )
    .unwrap();
    let b =
        RemoteRegion::attach(pair_client(&rig.pair, &o), addrs.clone(), shared_options()).unwrap();
    // A writes page 0 and flushes: the home has the bytes (a plain READ sees them) and A keeps
    // the write copy, so its next write needs no request.
    a.as_atomic_words()[0].store(42, SeqCst);
    assert_eq!(a.flush().unwrap(), 1);
    let home = rig.client.read_range(addrs[0], 0, 8).unwrap();
    assert_eq!(home, 42u64.to_le_bytes());
    a.as_atomic_words()[0].store(43, SeqCst);
    assert_eq!(
        a.stats().upgrades,
        0,
        "a flushed write copy is still the writer's"
    );
    // B has read page 1.
    assert_eq!(b.as_atomic_words()[dsm::WORDS].load(SeqCst), 0);
    rig.stop_server();
    rig.start_server();
    // B's read of page 0 can only fail (its home no longer knows the page): EFAULT through a
    // syscall, never the restarted server's zeros.
    let path = std::env::temp_dir().join(format!("bb-sharing-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let r = file.write_volatile(&b.as_volatile().subslice(0, PAGE_SIZE).unwrap());
    let _ = std::fs::remove_file(&path);
    let e = r.expect_err("page 0 cannot be fetched from the restarted home");
    let VolatileMemoryError::IOError(e) = e else {
        panic!("{e}")
    };
    assert_eq!(e.raw_os_error(), Some(libc_efault()), "{e}");
    // A's lease cannot be renewed at the new server: its copy is dropped, its write reported
    // lost (not silently kept or silently gone).
    let t = Instant::now();
    while a.stats().lost_writes == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "A's lease never lapsed: {:?}",
            a.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = a.stats();
    assert_eq!((st.lost_writes, st.lapses), (1, 1), "{st:?}");
    assert!(st.errors >= 1);
    drop(a);
    drop(b);
}

/// EFAULT on Linux (every architecture).
fn libc_efault() -> i32 {
    14
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn copies_cross_a_1500_byte_mtu_link_in_segments() {
    // A page takes three frames each way: GET replies in segments, write-backs as PUTs that
    // keep the write copy and a last one that gives it up.
    let o = RigOptions {
        mtu: 1500,
        client_udp: true,
        ..RigOptions::default()
    };
    let mut rig = Rig::new(&o);
    let addrs: Vec<RemoteAddr> = (0..5)
        .map(|_| rig.client.alloc(SERVER, true).unwrap())
        .collect();
    let clients = (0..3).map(|_| pair_client(&rig.pair, &o)).collect();
    let out = mp_then_lock(clients, &addrs, 30, 30);
    check_mp_then_lock(&out, 90, "across a 1500-byte MTU");
    let failed = rig.client.free_all(&addrs);
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn shared_pages_migrate_between_servers_while_three_hosts_count_under_a_lock() {
    // The controller moves the lock's and the counter's pages host 2 → 3 → 2 → 3 while every
    // host takes the lock and counts. Each move drains the page's copies first (REVOKE, and no
    // new copy granted meanwhile), then the page leaves frozen and its route follows: one home
    // answers at a time and the count stays exact.
    let rig = ControlledRack::new(RackOptions {
        clients: 3,
        ..RackOptions::default()
    });
    let _servers = [rig.server(1), rig.server(2)];
    let addrs = rig
        .client(12)
        .alloc_bulk(HostId(2), 2, true)
        .expect("shared pages");
    let clients = (0..3).map(|i| rig.client_on(i, 12)).collect();
    let (done, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    const ROUNDS: u64 = 20;
    let (moves, out) = std::thread::scope(|s| {
        let mover = s.spawn(|| {
            let mut moves = Vec::new();
            for to in [3u16, 2, 3] {
                std::thread::sleep(Duration::from_millis(200));
                for a in &addrs {
                    let m = migrate(&rig.ctl, &a.to_ipv6().to_string(), to).expect("migration");
                    moves.push((m.from, m.to, m.cutover_us));
                }
            }
            done.store(true, SeqCst);
            moves
        });
        let out = share(clients, &addrs, |host, region, barrier| {
            let w = region.as_atomic_words();
            let mut calls = 0u64;
            loop {
                calls += 1;
                let total = dsm::lock_counter(host, w, barrier, ROUNDS);
                assert_eq!(total, Some(calls * 3 * ROUNDS), "host {host}, call {calls}");
                // Host 0 decides for all whether to go on, between two barriers.
                if host == 0 {
                    stop.store(done.load(SeqCst), SeqCst);
                }
                barrier.wait();
                let last = stop.load(SeqCst);
                barrier.wait();
                if last {
                    break calls;
                }
            }
        });
        (mover.join().expect("the mover"), out)
    });
    eprintln!("migrations (from, to, cut-over µs): {moves:?}");
    clean(&out);
    assert_eq!(
        moves.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(),
        [(2, 3), (2, 3), (3, 2), (3, 2), (2, 3), (2, 3)]
    );
    let calls = out[0].0;
    assert!(calls > 1, "the hosts counted across the migrations");
    eprintln!("{} increments across 6 migrations", calls * 3 * ROUNDS);
    // Host 3 answers for both pages now; they free there.
    let failed = rig.client(12).free_all(&addrs);
    assert!(failed.is_empty(), "freeing: {failed:?}");
}
