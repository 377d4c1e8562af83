//! Debian packages the workspace needs: checked with dpkg-query, installed with apt-get (one
//! `apt-get update` first) only when some are missing.

use std::process::Command;

use anyhow::{Result, bail};

use crate::stage;

/// What builds and tests need, and why.
const REQUIRED: &[(&str, &str)] = &[
    (
        "clang",
        "compiles the XDP programs (ebpf/src/*.bpf.c) and libxdp for xsk-rs",
    ),
    ("libbpf-dev", "bpf_helpers.h for the XDP programs"),
    (
        "linux-libc-dev",
        "kernel UAPI headers (linux/bpf.h) for the XDP programs",
    ),
    ("libelf-dev", "libxdp/libbpf, built by xsk-rs"),
    ("zlib1g-dev", "libxdp/libbpf, built by xsk-rs"),
    ("m4", "libxdp's build, for xsk-rs"),
    ("pkg-config", "locating C libraries for -sys crates"),
    ("g++", "libFuzzer (libfuzzer-sys) is C++"),
    (
        "iproute2",
        "network namespaces and veth pairs for the topology and privileged tests",
    ),
    (
        "ethtool",
        "turning off veth checksum offload for the kernel-UDP transport tests",
    ),
    (
        "frr",
        "the BGP fabric's routers (zebra, staticd, bgpd, vtysh): `cargo xtask fabric`",
    ),
    (
        "tshark",
        "tshark and dumpcap: the Wireshark dissector's tests (tools/wireshark/bluebridge.lua)",
    ),
    (
        "openvswitch-switch",
        "the Open vSwitch backend (ovsdb-server, ovs-vswitchd, ovs-ofctl): `cargo xtask rack --backend ovs`",
    ),
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

pub(crate) fn ensure() -> Result<()> {
    let missing: Vec<&str> = REQUIRED
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        println!("      all {} present", REQUIRED.len());
        return Ok(());
    }
    for (p, why) in REQUIRED.iter().filter(|(p, _)| missing.contains(p)) {
        println!("      missing {p} ({why})");
    }
    if !is_root() {
        bail!(
            "packages missing ({}); run as root or install them",
            missing.join(" ")
        );
    }
    stage::status(Command::new("apt-get").arg("update").arg("-q"))?;
    stage::status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
