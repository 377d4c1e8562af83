use std::time::{Duration, Instant};

use bluebridge_ebpf::Steer;
use bluebridge_proto::frame::{Endpoints, Frame, build};
use bluebridge_proto::{BbRepr, HostId, MacAddr, NetPrefix, Opcode, RemoteAddr, Status, UDP_PORT};
use bluebridge_server::{Handler, HandlerConfig, Store};
use bluebridge_topology::{Pair, unique};
use bluebridge_xsk::{Xsk, XskConfig};

#[test]
fn ping_over_af_xdp() {
    let pair = Pair::create(&unique("bbt"), 9000).unwrap();
    let (sns, sif) = (pair.server.ns.clone(), pair.server.ifname.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        bluebridge_topology::enter(&sns).unwrap();
        let mut steer = Steer::load().unwrap();
        steer
            .add_prefix(NetPrefix::DEFAULT.host_network(HostId(2)), 48)
            .unwrap();
        println!("server attach {:?}", steer.attach(&sif, false));
        let mut xsk = Xsk::new(&XskConfig::new(&sif, 0)).unwrap();
        steer.set_socket(0, xsk.fd()).unwrap();
        let mut h = Handler::new(
            HandlerConfig::new(NetPrefix::DEFAULT, HostId(2), 2048),
            Store::new(2 << 20, true).unwrap(),
        );
        ready_tx.send(()).unwrap();
        let t0 = Instant::now();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            xsk.recv(|frame, tx| h.handle_frame(frame, t0.elapsed().as_nanos() as u64, tx));
            xsk.flush();
        }
        println!(
            "server stats {:?} {:?} {:?}",
            xsk.stats(),
            h.stats().requests,
            steer.counters()
        );
    });
    ready_rx.recv().unwrap();
    bluebridge_topology::enter(&pair.client.ns).unwrap();
    let mut steer = Steer::load().unwrap();
    let me: std::net::Ipv6Addr = "fd00:bb:1::1".parse().unwrap();
    steer.add_prefix(me, 128).unwrap();
    println!(
        "client attach {:?}",
        steer.attach(&pair.client.ifname, false)
    );
    let mut xsk = Xsk::new(&XskConfig::new(&pair.client.ifname, 0)).unwrap();
    steer.set_socket(0, xsk.fd()).unwrap();
    let dst = RemoteAddr::host_op(NetPrefix::DEFAULT, HostId(2), Opcode::PING);
    let ep = Endpoints {
        src_mac: MacAddr(pair.client.mac),
        dst_mac: MacAddr(pair.server.mac),
        src: me,
        dst: dst.to_ipv6(),
        src_port: 40000,
        dst_port: UDP_PORT,
    };
    let mut got = 0;
    let mut lat = vec![];
    for i in 1..=2000u64 {
        let h = BbRepr {
            count: 1,
            request_id: i,
            ..Default::default()
        };
        let t = Instant::now();
        assert!(xsk.tx().send_with(bluebridge_proto::FRAME_OVERHEAD, |b| {
            build(b, &ep, &h, &[]).unwrap();
        }));
        xsk.flush();
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut done = false;
        while !done && Instant::now() < deadline {
            xsk.recv(|f, _| {
                let fr = Frame::parse(f).unwrap();
                assert_eq!(fr.header.status, Status::OK);
                assert_eq!(fr.header.request_id, i);
                done = true;
            });
            xsk.flush();
        }
        if done {
            got += 1;
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    println!(
        "got {got} p50 {:?} p99 {:?}; client steer {:?} xsk {:?}",
        lat.get(lat.len() / 2),
        lat.get(lat.len() * 99 / 100),
        steer.counters(),
        xsk.stats()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(got, 2000);
}
