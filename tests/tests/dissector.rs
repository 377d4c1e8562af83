//! The Wireshark dissector (tools/wireshark/bluebridge.lua) on a real capture: a client uses
//! every kind of request through a rack whose switch namespace forwards with its kernel (so
//! dumpcap sees every frame on the switch's ports), a page migrates, and tshark decodes the
//! capture with the dissector: every BlueBridge frame gets its opcode and status, every reply
//! its request, no expert error, and the counts match what the client did.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bluebridge_client::ClientError;
use bluebridge_proto::frame::Endpoints;
use bluebridge_proto::wire::header::BbRepr;
use bluebridge_proto::{
    HeaderFlags, HostId, MacAddr, NetPrefix, OpFlags, Opcode, PageHandle, RemoteAddr, Status,
};
use bluebridge_tests::controlled::{ControlledRack, RackOptions};
use pcap_file::pcap::{PcapPacket, PcapWriter};

fn dissector() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/wireshark/bluebridge.lua")
}

/// dumpcap in a namespace, stopped (SIGINT, so the file is complete) on drop.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, ifaces: &[&str], file: &Path) -> Capture {
        let _ = std::fs::remove_file(file);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "dumpcap", "-q", "-w"])
            .arg(file);
        for i in ifaces {
            cmd.args(["-i", i]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dumpcap (Debian's tshark package; cargo xtask test installs it)");
        let mut c = Capture {
            child: Some(child),
            file: file.to_owned(),
        };
        // dumpcap writes the file's header once every interface is open.
        let t = Instant::now();
        while std::fs::metadata(file).map_or(0, |m| m.len()) == 0 {
            if let Some(st) = c.child.as_mut().unwrap().try_wait().unwrap() {
                let out = c.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "dumpcap exited ({st}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "dumpcap never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        c
    }

    /// Stops the capture and returns its file.
    fn finish(mut self) -> PathBuf {
        self.stop();
        self.file.clone()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Let the last frames in, then SIGINT: dumpcap flushes and exits.
            std::thread::sleep(Duration::from_millis(300));
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(5) {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// tshark with the dissector on `file`: `fields` of the frames matching `filter`, one row each.
fn tshark(file: &Path, filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-X")
        .arg(format!("lua_script:{}", dissector().display()))
        .arg("-r")
        .arg(file)
        .args([
            "-Y",
            filter,
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-E",
            "occurrence=f",
        ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tshark failed: {stderr}");
    assert!(
        !stderr.contains("Lua") && !stderr.contains("lua"),
        "the dissector did not load cleanly: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect()
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (namespaces, XDP, AF_XDP, dumpcap): run as root or `cargo xtask test`"
)]
fn tshark_decodes_every_frame_of_a_session() {
    let rig = ControlledRack::new(RackOptions {
        hosts: 3,
        kernel: true,
        ..RackOptions::default()
    });
    let _servers = [rig.server(1), rig.server(2)];
    let r = &rig.rack;
    let file = std::env::temp_dir().join(format!("{}.pcapng", r.switch));
    // Host 0's client port, host 1's server port, the controller's port.
    let ports = [
        r.hosts[0].client_port.clone(),
        r.hosts[1].server_port.clone(),
        r.controller_port.clone(),
    ];
    let capture = Capture::start(&r.switch, &ports.each_ref().map(String::as_str), &file);
    let host = HostId(r.hosts[1].host_id);
    let mut c = rig.client(12);
    let before = c.stats();

    // One of every kind of request (and its reply).
    c.ping(host).unwrap();
    let st = c.stat(host).unwrap();
    assert!(st.pages_total > 0);
    let p = c.alloc(host, false).unwrap();
    let bulk = c.alloc_bulk(host, 4, false).unwrap();
    let q = c.alloc_write(host, 0, b"hello", false).unwrap();
    c.write(p, 0, &[7; 4096]).unwrap();
    assert_eq!(c.read(p).unwrap(), vec![7; 4096]);
    assert_eq!(c.read_range(q, 0, 5).unwrap(), b"hello");
    let items: Vec<(_, u16, &[u8])> = bulk.iter().map(|&b| (b, 8u16, &b"bulk"[..])).collect();
    assert!(c.write_bulk(&items).unwrap().iter().all(Result::is_ok));
    let got = c.read_bulk(&bulk, 8, 4).unwrap();
    assert!(got.iter().all(|r| r.as_deref() == Ok(&b"bulk"[..])));
    assert_eq!(c.cas(q, 8, 0, 5).unwrap(), 0);
    assert_eq!(c.fetch_add(q, 8, 1).unwrap(), 5);
    let (lease, _) = c.update_acquire(q, 0, 5, 0).unwrap();
    c.update_commit(q, lease, 0, b"HELLO").unwrap();
    let (lease, _) = c.update_acquire(q, 0, 5, 0).unwrap();
    c.update_release(q, lease).unwrap();
    c.share(q).unwrap();
    assert!(c.free_bulk(&bulk).unwrap().iter().all(Result::is_ok));
    // A page that moves, and one that is freed and then read: STALE_HANDLE.
    bluebridge_switch::actions::migrate(&rig.ctl, &p.to_ipv6().to_string(), r.hosts[2].host_id)
        .expect("migration");
    assert_eq!(c.read_range(p, 0, 8).unwrap(), [7; 8]);
    c.free(q).unwrap();
    assert_eq!(c.read_range(q, 0, 8), Err(ClientError::StaleHandle));
    let after = c.stats();
    let file = capture.finish();

    // Every BlueBridge frame decodes.
    let all = tshark(
        &file,
        "udp.port == 47872",
        &[
            "frame.number",
            "frame.interface_name",
            "bluebridge.opcode",
            "bluebridge.status",
            "bluebridge.flags.reply",
            "bluebridge.request_in",
            "bluebridge.response_in",
            "bluebridge.time",
        ],
    );
    assert!(all.len() > 40, "{} frames captured", all.len());
    let mut requests: BTreeMap<String, u64> = BTreeMap::new();
    let mut replies: BTreeMap<(String, String), u64> = BTreeMap::new();
    for row in &all {
        let [n, iface, op, status, reply, request_in, _response_in, time] = &row[..] else {
            panic!("{row:?}");
        };
        assert!(!op.is_empty(), "frame {n}: no opcode decoded");
        let op = op.trim_start_matches("0x").to_owned();
        let reply = reply == "1" || reply == "True";
        if reply {
            assert!(
                !request_in.is_empty() && !time.is_empty(),
                "frame {n}: reply without its request: {row:?}"
            );
        }
        // Each frame crosses two of the ports: counted once, at the client's (or the
        // controller's).
        if *iface == ports[1] {
            continue;
        }
        if reply {
            *replies.entry((op, status.clone())).or_default() += 1;
        } else {
            *requests.entry(op).or_default() += 1;
        }
    }
    // The client's requests and retransmissions, opcode by opcode (hex), with the controller's.
    let retrans = after.retransmits - before.retransmits;
    let keepalives = after.keepalives - before.keepalives;
    let want: [(&str, u64); 19] = [
        ("01", 1),
        ("02", 1),
        ("10", 1),
        ("12", 1),
        ("11", 1),
        ("30", 1),
        ("20", 4),
        ("32", 1),
        ("21", 1),
        ("60", 1),
        ("61", 1),
        ("40", 2),
        ("41", 1),
        ("42", 1),
        ("70", 1),
        ("51", 1),
        ("50", 1),
        ("80", 1),
        ("81", 1),
    ];
    for (op, n) in want {
        let got = requests.get(op).copied().unwrap_or(0);
        let n = if op == "01" { n + keepalives } else { n };
        assert!(
            (n..=n + retrans).contains(&got),
            "opcode 0x{op}: {got} requests in the capture, the client sent {n} (+{retrans} retransmitted): {requests:?}"
        );
    }
    // Statuses: the freed page's read, and nothing else failed.
    let errors: u64 = replies
        .iter()
        .filter(|((_, st), _)| st != "0")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(errors, 1, "{replies:?}");
    assert_eq!(
        replies.get(&("20".into(), "4".into())),
        Some(&1),
        "{replies:?}"
    );
    // The READs went INLINE (padded to their replies' size, §6.1), decoded as such.
    assert!(after.inline_sent > before.inline_sent);
    let inline = tshark(
        &file,
        "bluebridge.flags.inline == 1 && bluebridge.flags.reply == 0",
        &["bluebridge.length", "bluebridge.padding"],
    );
    assert!(
        inline.iter().any(|r| r[0] == "4096")
            && inline
                .iter()
                .all(|r| r[1].len() == 2 * r[0].parse::<usize>().unwrap()),
        "INLINE READs (a page, short ranges) padded with their length: {inline:?}"
    );
    let shown = tshark(&file, "bluebridge.status == 4", &["_ws.col.Info"]);
    assert!(
        shown[0][0].contains("READ reply STALE_HANDLE"),
        "the status by name: {:?}",
        shown[0]
    );
    // No expert error (malformed, or the dissector failing) in any frame.
    let bad = tshark(
        &file,
        "_ws.expert.severity == \"Error\" || _ws.malformed",
        &["frame.number", "_ws.expert.message"],
    );
    assert!(bad.is_empty(), "expert errors: {bad:?}");
    let _ = std::fs::remove_file(&file);
}

/// One frame of the synthetic capture.
fn frame(src: Ipv6Addr, dst: Ipv6Addr, ports: (u16, u16), h: &BbRepr, payload: &[u8]) -> Vec<u8> {
    let ep = Endpoints {
        src_mac: MacAddr([2, 0xbb, 0, 0, 0, 1]),
        dst_mac: MacAddr([2, 0xbb, 0, 0, 0, 2]),
        src,
        dst,
        src_port: ports.0,
        dst_port: ports.1,
    };
    let mut buf = vec![0u8; 9000];
    let n = bluebridge_proto::frame::build(&mut buf, &ep, h, payload).unwrap();
    buf.truncate(n);
    buf
}

/// The notices a live capture of one host rarely holds (INVALIDATE from the controller,
/// REVOKE and READY from a page's home), a MOVED reply, and two broken frames the dissector
/// must flag: a truncated header and a READ_BULK whose handle list is shorter than its count.
#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs tshark (Debian's tshark package; cargo xtask test installs it)"
)]
fn tshark_decodes_notices_and_flags_broken_frames() {
    let prefix = NetPrefix::DEFAULT;
    let client: Ipv6Addr = "fd00:bb:1:ffff::1".parse().unwrap();
    let page = RemoteAddr::new(
        prefix,
        HostId(2),
        PageHandle::from_bits(0x0100_0000_0000_002a),
        Opcode::READ,
        OpFlags::NONE,
    );
    let at = |op: Opcode| page.with_op(op, OpFlags::NONE).to_ipv6();
    // Notices are reply-shaped; the opcode is in the source address.
    let notice = |lease: u64, keep: u64| BbRepr {
        flags: HeaderFlags::REPLY,
        count: 1,
        lease,
        operand0: keep,
        ..BbRepr::default()
    };
    let ctl = RemoteAddr::host_op(prefix, HostId(0x7fff), Opcode::INVALIDATE).to_ipv6();
    let freed = page.with_op(Opcode(0), OpFlags::NONE).to_ipv6().octets();
    let read = BbRepr {
        count: 1,
        request_id: 0x77,
        length: 8,
        flags: HeaderFlags::RETRY,
        ..BbRepr::default()
    };
    let moved = BbRepr {
        flags: HeaderFlags::REPLY,
        status: Status::MOVED,
        ..read
    };
    let mut truncated = frame(client, at(Opcode::PING), (40000, 47872), &read, &[]);
    truncated.truncate(14 + 40 + 8 + 20);
    // The IPv6 payload length and the UDP length say 28 bytes.
    truncated[18..20].copy_from_slice(&28u16.to_be_bytes());
    truncated[58..60].copy_from_slice(&28u16.to_be_bytes());
    let short_list = BbRepr {
        count: 2,
        request_id: 0x78,
        length: 8,
        ..BbRepr::default()
    };
    let frames = [
        frame(ctl, client, (47872, 40000), &notice(0, 0), &freed),
        frame(
            at(Opcode::REVOKE),
            client,
            (47872, 40001),
            &notice(9, 1),
            &[],
        ),
        frame(
            at(Opcode::READY),
            client,
            (47872, 40001),
            &notice(0, 0),
            &[],
        ),
        frame(client, at(Opcode::READ), (40001, 47872), &read, &[]),
        frame(at(Opcode::READ), client, (47872, 40001), &moved, &[]),
        truncated,
        frame(
            client,
            at(Opcode::READ_BULK),
            (40001, 47872),
            &short_list,
            &[0; 12],
        ),
    ];
    let file = write_pcap(&frames);
    let rows = tshark(
        &file,
        "bluebridge",
        &[
            "frame.number",
            "_ws.col.Info",
            "bluebridge.notice",
            "bluebridge.invalidate.page",
            "bluebridge.request_in",
            "bluebridge.retransmission",
        ],
    );
    // Only the two broken frames carry an expert error.
    let errors: Vec<String> = tshark(&file, "_ws.expert.severity == \"Error\"", &["frame.number"])
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let _ = std::fs::remove_file(&file);
    assert_eq!(errors, ["6", "7"]);
    assert_eq!(rows.len(), 7, "{rows:?}");
    let info: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(info[0], "INVALIDATE notice");
    assert_eq!(
        rows[0][3],
        Ipv6Addr::from(freed).to_string(),
        "the freed page"
    );
    assert_eq!(info[1], "REVOKE notice");
    assert_eq!(info[2], "READY notice");
    let yes = |v: &str| v == "1" || v == "True";
    for r in &rows[..3] {
        assert!(yes(&r[2]), "a notice: {r:?}");
    }
    assert!(
        info[3].starts_with("READ request id 0x0000000000000077"),
        "{}",
        info[3]
    );
    assert!(
        yes(&rows[3][5]),
        "RETRY marks a retransmission: {:?}",
        rows[3]
    );
    assert!(info[4].starts_with("READ reply MOVED"), "{}", info[4]);
    assert_eq!(rows[4][4], "4", "the MOVED reply answers frame 4");
    assert_eq!(info[5], "BlueBridge (truncated)");
}

/// `frames` in a new pcap file (Ethernet).
fn write_pcap(frames: &[Vec<u8>]) -> PathBuf {
    let file = std::env::temp_dir().join(format!("bbt-dissector-{}.pcap", std::process::id()));
    let mut w = PcapWriter::new(std::fs::File::create(&file).unwrap()).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let ts = Duration::from_millis(i as u64);
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
    file
}
