//! Clients that vanish, servers that stop and start again, and the server binary's exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_proto::{BbRepr, OpFlags, Opcode, PAGE_SIZE};
use bluebridge_server::TransportKind;
use bluebridge_tests::{Rig, RigOptions, SERVER};
use bluebridge_topology::{Pair, ip_in, unique};

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn the_lease_of_a_vanished_client_expires() {
    let mut rig = Rig::new(&RigOptions::default());
    let p = rig.client.alloc(SERVER, true).unwrap();
    // Another client (fd00:bb:1::77) acquires the lease for 80 ms and is never heard of again.
    let (mut f, ep) = rig.raw_request(
        p.with_op(Opcode::UPDATE_ACQUIRE, OpFlags::NONE),
        &BbRepr {
            count: 1,
            request_id: 1,
            operand0: 80,
            ..BbRepr::default()
        },
        &[],
    );
    f[22..38].copy_from_slice(
        &"fd00:bb:1::77"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    bluebridge_proto::wire::udp::UdpPacket::new_unchecked(&mut f[54..])
        .fill_checksum("fd00:bb:1::77".parse().unwrap(), ep.dst);
    assert!(rig.xdp().send_raw(&f));
    let t = Instant::now();
    // Until it expires the page is locked against writers.
    let held = loop {
        match rig.client.update_acquire(p, 0, 0, 0) {
            Err(ClientError::LeaseHeld) => break true,
            Ok((lease, _)) => {
                // The raw acquire had not arrived yet; give it back and look again.
                rig.client.update_release(p, lease).unwrap();
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "the vanished client's acquire never arrived"
                );
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(held);
    assert_eq!(rig.client.write(p, 0, b"x"), Err(ClientError::LeaseHeld));
    std::thread::sleep(Duration::from_millis(100));
    let (lease, _) = rig.client.update_acquire(p, 0, 8, 0).unwrap();
    rig.client.update_commit(p, lease, 0, b"mine now").unwrap();
    assert_eq!(rig.client.read_range(p, 0, 8).unwrap(), b"mine now");
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_restarted_server_gives_errors_never_stale_data() {
    let mut rig = Rig::new(&RigOptions {
        rto: Duration::from_millis(2),
        retries: 3,
        ..RigOptions::default()
    });
    let p = rig.client.alloc(SERVER, false).unwrap();
    let secret = vec![0x5a; PAGE_SIZE];
    rig.client.write(p, 0, &secret).unwrap();

    rig.stop_server();
    assert!(
        matches!(rig.client.read(p), Err(ClientError::Timeout { .. })),
        "a stopped server times out"
    );

    rig.start_server();
    // The old handle means nothing to the new server (new store, new handle key).
    assert!(matches!(
        rig.client.read(p),
        Err(ClientError::InvalidHandle | ClientError::StaleHandle)
    ));
    assert!(matches!(
        rig.client.write(p, 0, b"x"),
        Err(ClientError::InvalidHandle | ClientError::StaleHandle)
    ));
    // New pages are zero: nothing of the old server's memory comes back.
    for _ in 0..16 {
        let q = rig.client.alloc(SERVER, false).unwrap();
        assert!(rig.client.read(q).unwrap().iter().all(|&b| b == 0));
    }
}

/// §5.17: a client that holds pages and keeps quiet but alive (the reference client pings
/// while idle) keeps them; once it is silent past the server's grace period its pages are
/// freed, all but the shared and the detached ones, on both server transports.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_silent_clients_pages_are_reclaimed_and_a_live_ones_kept() {
    for transport in [TransportKind::Xdp, TransportKind::Udp] {
        silent_owner_on(transport);
    }
}

fn silent_owner_on(transport: TransportKind) {
    let mut rig = Rig::new(&RigOptions {
        server_transport: transport,
        client_udp: transport == TransportKind::Udp,
        orphan_grace_ms: 2_000,
        ..RigOptions::default()
    });
    let c = &mut rig.client;
    let lost = c.alloc_bulk(SERVER, 3, false).unwrap();
    let shared = c.alloc(SERVER, true).unwrap();
    let detached = c.alloc(SERVER, false).unwrap();
    for (i, &p) in lost.iter().chain([&shared, &detached]).enumerate() {
        c.write(p, 0, &[i as u8 + 1; 64]).unwrap();
    }
    c.detach(detached).unwrap();
    let st = c.stat(SERVER).unwrap();
    assert_eq!((st.pages_used, st.orphan_grace_ms), (5, 2_000));

    // Idle but alive for 3.5 s, past the grace period: nothing goes.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(3_500) {
        rig.client.keep_alive();
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = rig.server().stats();
    assert_eq!((s.pages_used, s.handler.reclaimed), (5, 0), "{transport:?}");

    // Silent from a last request on: the three private pages go after the grace period and
    // a few checks.
    rig.client.ping(SERVER).unwrap();
    let t = Instant::now();
    while rig.server().stats().pages_used > 2 {
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{transport:?}: not reclaimed: {:?}",
            rig.server().stats().handler
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(t.elapsed() >= Duration::from_millis(1_900), "{transport:?}");
    assert_eq!(rig.server().stats().handler.reclaimed, 3);
    let c = &mut rig.client;
    for &p in &lost {
        assert_eq!(c.read(p), Err(ClientError::StaleHandle), "{transport:?}");
    }
    assert_eq!(c.read_range(shared, 0, 64).unwrap(), [4; 64]);
    assert_eq!(c.read_range(detached, 0, 64).unwrap(), [5; 64]);
    let st = c.stat(SERVER).unwrap();
    assert_eq!((st.pages_used, st.reclaimed), (2, 3), "{transport:?}");
}

/// Item 13: the client's demo frees every page it allocated when stopped with Ctrl-C (or
/// SIGTERM) mid-run, and says so.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn the_client_demo_frees_its_pages_when_interrupted() {
    let rig = Rig::new(&RigOptions {
        server_transport: TransportKind::Udp,
        client_udp: true,
        ..RigOptions::default()
    });
    let bin = binary("bluebridge-client", "bluebridge-client");
    for sig in ["INT", "TERM"] {
        let demo = Process::start(
            Command::new("ip")
                .args(["netns", "exec", &rig.pair.client.ns])
                .arg(&bin)
                .args(["--iface", &rig.pair.client.ifname, "--transport", "udp"])
                .args(["demo", "--host", "2", "--pages", "64", "--seconds", "600"]),
        );
        let t = Instant::now();
        while rig.server().stats().pages_used < 64 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "SIG{sig}: the demo never allocated its pages"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        demo.signal(sig);
        let out = demo.finish();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(130),
            "SIG{sig}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("interrupted; all 64 pages freed"),
            "SIG{sig}: {stdout:?}"
        );
        assert_eq!(rig.server().stats().pages_used, 0, "SIG{sig}");
        assert_eq!(
            rig.server().stats().handler.reclaimed,
            0,
            "freed, not reclaimed"
        );
    }
}

/// `target/<profile>/<name>`, built by `cargo build -p <package>` (cargo xtask test does).
fn binary(package: &str, name: &str) -> PathBuf {
    bluebridge_tests::built(name, &format!("`cargo build -p {package}`"))
}

fn server_binary() -> PathBuf {
    binary("bluebridge-server", "bluebridge-server")
}

/// A child process (output piped), killed if the test ends before [`Process::finish`].
struct Process(Option<std::process::Child>);

impl Process {
    fn start(cmd: &mut Command) -> Process {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Process(Some(child))
    }

    /// Sends `SIG<sig>` (e.g. "INT").
    fn signal(&self, sig: &str) {
        let id = self.0.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{sig}"), &id])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{sig} {id}");
    }

    /// Waits for it to end and returns its status and output.
    fn finish(mut self) -> std::process::Output {
        self.0.take().expect("running").wait_with_output().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The server binary in `pair`'s server namespace (host 2, an 8 MiB arena, no stats lines)
/// with `extra` flags, once it has attached XDP.
fn start_server_binary(pair: &Pair, extra: &[&str]) -> Process {
    let (ns, ifname) = (&pair.server.ns, &pair.server.ifname);
    let server = Process::start(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(server_binary())
            .args(["--iface", ifname, "--host-id", "2", "--arena", "8MiB"])
            .args(["--no-hugepages", "--stats-interval", "0"])
            .args(extra),
    );
    wait_attached(ns, ifname);
    server
}

/// Waits (20 s at most) for a server process to attach its XDP program.
fn wait_attached(ns: &str, ifname: &str) {
    let t = Instant::now();
    while !xdp_attached(ns, ifname) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server never attached XDP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn xdp_attached(ns: &str, ifname: &str) -> bool {
    ip_in(ns, &["link", "show", "dev", ifname])
        .unwrap()
        .contains("xdp")
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn the_server_binary_detaches_xdp_on_every_exit() {
    for (sig, graceful) in [("INT", true), ("TERM", true), ("KILL", false)] {
        let pair = Pair::create(&unique("bbt"), 9000).unwrap();
        let (ns, ifname) = (pair.server.ns.clone(), pair.server.ifname.clone());
        let server = start_server_binary(&pair, &[]);
        // Give the workers a moment to run before the signal.
        std::thread::sleep(Duration::from_millis(200));
        server.signal(sig);
        let out = server.finish();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if graceful {
            assert!(out.status.success(), "SIG{sig}: exit {:?}", out.status);
            assert!(
                stdout.contains("XDP detached"),
                "SIG{sig}: no summary in {stdout:?}"
            );
        }
        // On SIGKILL the kernel drops the BPF link with the process's descriptors.
        let t = Instant::now();
        while xdp_attached(&ns, &ifname) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "SIG{sig}: XDP still attached after exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Item 15: frames the kernel drops for a full AF_XDP ring are counted, not lost silently. The
/// server process is stopped (SIGSTOP) while the XDP program keeps steering requests into its
/// ring; once it runs again STAT's `kernel_dropped` holds what did not fit, and every request
/// is either answered or counted.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn requests_the_kernel_drops_for_a_full_ring_are_counted() {
    let pair = Pair::create(&unique("bbt"), 9000).unwrap();
    // 256 frames: 128 RX descriptors.
    let server = start_server_binary(&pair, &["--idle", "--frames", "256"]);
    let mut c = bluebridge_tests::pair_client(&pair, &RigOptions::default());
    let ping = |c: &mut bluebridge_client::Client<_>| {
        let t = Instant::now();
        while c.ping(SERVER).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the server does not answer"
            );
        }
    };
    ping(&mut c);
    let base = c.stat(SERVER).unwrap();
    let before = c.stats();
    server.signal("STOP");
    // 2,000 PINGs, from a port of their own; paced so the veth's own queue (256) never fills:
    // what the XDP program redirects meets the stopped server's ring.
    let n = 2_000u64;
    let ep = bluebridge_proto::frame::Endpoints {
        src_mac: bluebridge_proto::MacAddr(pair.client.mac),
        dst_mac: bluebridge_proto::MacAddr(pair.server.mac),
        src: bluebridge_tests::client_addr(),
        dst: bluebridge_proto::RemoteAddr::host_op(
            bluebridge_proto::NetPrefix::DEFAULT,
            SERVER,
            Opcode::PING,
        )
        .to_ipv6(),
        src_port: 41_500,
        dst_port: bluebridge_proto::UDP_PORT,
    };
    let xdp = c.transport_mut().xdp_mut().expect("an AF_XDP client");
    for i in 0..n {
        let h = BbRepr {
            count: 1,
            request_id: (i + 1) << bluebridge_proto::SESSION_SLOT_BITS,
            ..BbRepr::default()
        };
        let mut f = vec![0u8; bluebridge_proto::FRAME_OVERHEAD];
        bluebridge_proto::frame::build(&mut f, &ep, &h, &[]).unwrap();
        while !xdp.send_raw(&f) {
            std::thread::yield_now();
        }
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    server.signal("CONT");
    // The worker publishes the socket's counters within a few hundred ms of running again.
    let t = Instant::now();
    let mut stats = 0;
    let st = loop {
        let st = c.stat(SERVER).unwrap();
        stats += 1;
        if st.kernel_dropped > base.kernel_dropped && st.requests >= base.requests + 128 {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no kernel drops counted: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let dropped = st.kernel_dropped - base.kernel_dropped;
    // The client's own frames since `base`: the STATs, their retransmissions (a STAT that met
    // the full ring, or waited behind the backlog, is sent again and may be served twice) and
    // keep-alives. Each of them, like each PING, is served or dropped.
    let after = c.stats();
    let frames = (after.sent + after.retransmits) - (before.sent + before.retransmits);
    let handled = st.requests - base.requests;
    let served = handled.saturating_sub(frames); // the PINGs that fitted, at least
    assert!(
        (n..=n + frames).contains(&(dropped + handled)) && served >= 64,
        "{n} sent, {dropped} dropped, {handled} served ({stats} STATs, {frames} client frames): \
         some are in no counter"
    );
    eprintln!("{n} sent to a stopped server: {dropped} dropped by the kernel, {served} served");
    server.signal("INT");
    assert!(server.finish().status.success());
}

/// Item 16: a worker under SCHED_IDLE (the default) that a CPU-bound process on its core
/// starves moves itself to normal priority and keeps answering; the summary counts it.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn a_starved_worker_leaves_sched_idle_and_keeps_answering() {
    let pair = Pair::create(&unique("bbt"), 9000).unwrap();
    let server = start_server_binary(&pair, &["--cores", "0"]);
    let mut c = bluebridge_tests::pair_client(&pair, &RigOptions::default());
    c.ping(SERVER).expect("answered before the neighbour comes");
    // A CPU-bound neighbour of normal priority on the worker's core.
    let _hog = Process::start(Command::new("taskset").args([
        "-c",
        "0",
        "sh",
        "-c",
        "while :; do :; done",
    ]));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    while c.ping(SERVER).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the starved worker never answered again"
        );
    }
    for i in 0..20 {
        c.ping(SERVER)
            .unwrap_or_else(|e| panic!("ping {i} beside the neighbour: {e}"));
    }
    server.signal("INT");
    let out = server.finish();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("priority fallbacks 1"), "{text}");
    assert!(text.contains("worker starved under SCHED_IDLE"), "{text}");
}

/// Issue 12, item 17: a bad number on the command line is one clear line and exit status 2,
/// before anything is attached: no panic, no backtrace, no giant allocation.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP): run as root or `cargo xtask test`"
)]
fn bad_numbers_on_the_command_line_are_one_line_each() {
    let bad: [&[&str]; 12] = [
        &["--orphan-grace-ms", "1000"],
        &["--orphan-grace-ms", "86400001"],
        &["--orphan-grace-ms", "1e3"],
        &["--max-owners", "4294967296"],
        &["--max-owners", "18446744073709551615"],
        &["--stats-interval", "1e300"],
        &["--stats-interval", "nan"],
        &["--lease-max-ms", "18446744073709551615"],
        &["--lease-default-ms", "0"],
        &["--cores", "99999"],
        &["--frames", "1000"],
        &["--sessions", "0"],
    ];
    for args in bad {
        let out = Command::new(server_binary())
            .args(["--iface", "bbt-none-such", "--host-id", "2"])
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let first = err.lines().next().unwrap_or("");
        assert!(first.starts_with("error: invalid value"), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
    }
    // One that passes every number check reaches the interface and says what is wrong with it.
    let out = Command::new(server_binary())
        .args([
            "--iface",
            "bbt-none-such",
            "--host-id",
            "2",
            "--lease-default-ms",
            "70000",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--lease-max-ms"),
        "{err}"
    );
}
