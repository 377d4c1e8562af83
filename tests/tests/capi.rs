//! The C API from C: examples/c/remote_sort (built by `cargo xtask capi` with the system C
//! compiler against libbluebridge.a, as `cargo xtask test` does before these tests) run
//! against a real server over AF_XDP, and over kernel UDP with bad arguments.

use std::path::PathBuf;
use std::process::Command;

use bluebridge_proto::HostId;
use bluebridge_server::ServerConfig;
use bluebridge_tests::start_server;
use bluebridge_topology::{Pair, fmt_mac, unique};

fn example() -> PathBuf {
    bluebridge_tests::built("examples-c/remote_sort", "`cargo xtask capi`")
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP, userfaultfd): run as root or `cargo xtask test`"
)]
fn the_c_example_sorts_an_array_in_remote_memory() {
    let pair = Pair::create(&unique("bbt"), 9000).expect("creating namespaces (needs root)");
    let server = start_server(
        &pair.server.ns,
        &ServerConfig {
            arena_bytes: 16 << 20,
            idle: true,
            sched_idle: false,
            hugepages: false,
            ..ServerConfig::new(&pair.server.ifname, HostId(2))
        },
    );
    let run = |extra: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &pair.client.ns])
            .arg(example())
            .args(["--iface", &pair.client.ifname])
            .args(["--next-hop-mac", &fmt_mac(pair.server.mac)])
            .args(["--host", "2"])
            .args(extra)
            .output()
            .expect("running remote_sort")
    };
    let out = run(&["--pages", "256", "--budget", "64"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    eprint!("{stdout}");
    assert!(
        stdout.contains("(then BB_STALE_HANDLE)"),
        "the freed page's status by name: {stdout}"
    );
    assert!(stdout.contains("all read back"), "{stdout}");
    assert!(
        stdout.contains("131072 uint64_t (256 pages, 64 resident)"),
        "{stdout}"
    );
    assert!(stdout.contains("reattached: sorted"), "{stdout}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    let s = server.stats().handler;
    // 256 pages of the region, 9 of the blocking and pipelined parts: all freed again.
    assert_eq!(s.pages_used, 0, "every page freed: {s:?}");
    assert!(s.ops[0x12] >= 2, "the region allocated in bulk");

    // A bad option is one clear line and a non-zero exit, before anything is opened.
    let out = run(&["--local", "not-an-address"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bb_open(&o, &c): BB_INVALID_ARGUMENT (local:"),
        "{stderr}"
    );
    drop(server);
}
