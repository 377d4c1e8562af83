//! What the controller does over the network — health checks, page migrations, INVALIDATE
//! notices, listing and reclaiming page owners — split from its state so that the state's
//! lock is never held across network I/O. Each action decides under the [`Controller`] lock (a few map updates: fast), does its I/O
//! holding only the controller's link, and records the outcome under the lock again. So the
//! control API (status, routes, registration) answers while a dead host's health check waits
//! out its retries (~75 ms) or a migration copies a page; only other link users wait for the
//! link.

use std::net::Ipv6Addr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bluebridge_client::{AnyTransport, Client, ClientError, Request};
use bluebridge_proto::{HeaderFlags, HostId, MacAddr, Opcode, PAGE_SIZE, RemoteAddr};

use crate::{
    CONTROLLER_HOST, Controller, CtlError, Migration, MigrationPlan, Notices, OwnerInfo, Reclaimed,
};

/// The controller, held: the route changes made meanwhile reach the forwarding plane in one
/// batch when it is released ([`Held::release`], or on drop, which logs a refusal).
pub(crate) struct Held<'a>(MutexGuard<'a, Controller>);

impl Held<'_> {
    /// Releases the controller after applying its route changes.
    pub(crate) fn release(mut self) -> Result<(), CtlError> {
        self.0.commit()
    }
}

impl std::ops::Deref for Held<'_> {
    type Target = Controller;
    fn deref(&self) -> &Controller {
        &self.0
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Controller {
        &mut self.0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.commit() {
            tracing::error!(error = %e, "applying route changes");
        }
    }
}

/// Holds the controller (see [`Held`]).
pub(crate) fn lock(ctl: &Mutex<Controller>) -> Held<'_> {
    Held(ctl.lock().unwrap_or_else(PoisonError::into_inner))
}

/// One round of health checks: a STAT to every host in `ids` at once through the controller's
/// link, each given up `timeout` after it was sent (so a round lasts at most that long, however
/// many hosts are dead); each result recorded with [`Controller::health_result`].
pub fn check_hosts(
    ctl: &Mutex<Controller>,
    ids: &[u16],
    timeout: std::time::Duration,
) -> Result<(), CtlError> {
    let (link, prefix) = {
        let c = lock(ctl);
        (c.link(), c.prefix())
    };
    let results = {
        let mut c = link.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(c) = c.as_mut() else {
            return Ok(());
        };
        let reqs: Vec<u64> = ids
            .iter()
            .map(|&id| {
                let at = RemoteAddr::host_op(prefix, HostId(id), Opcode::STAT);
                c.submit(Request::new(Opcode::STAT, at).timeout(timeout))
            })
            .collect();
        // Waited for in short sleeps, not by spinning: a round with a dead host lasts the
        // whole timeout, every round, and the controller shares the machine with servers.
        let mut got: Vec<Option<Result<bluebridge_client::Reply, ClientError>>> =
            vec![None; reqs.len()];
        let mut left = reqs.len();
        while left > 0 {
            match c.poll() {
                Some(done) => {
                    if let Some(k) = reqs.iter().position(|&id| id == done.id)
                        && got[k].is_none()
                    {
                        got[k] = Some(done.result);
                        left -= 1;
                    }
                }
                None => std::thread::sleep(std::time::Duration::from_micros(100)),
            }
        }
        got.into_iter()
            .map(|r| r.expect("every check completed"))
            .collect::<Vec<_>>()
    };
    let results = ids
        .iter()
        .zip(results)
        .map(|(&id, r)| {
            let r = r.and_then(|rep| {
                bluebridge_proto::message::StatRecord::parse(&rep.data)
                    .ok_or(ClientError::BadReply("short STAT record"))
            });
            (id, r)
        })
        .collect();
    lock(ctl).health_round(results)
}

/// Sends one order (BACKUP, REPLICA, PROMOTE; docs/protocol.md §5.19) to `to`'s host
/// address and returns its status; BUSY is asked again for up to `patience`.
#[expect(
    clippy::too_many_arguments,
    reason = "one order's fields, named at each call"
)]
fn order(
    c: &mut Client<AnyTransport>,
    prefix: bluebridge_proto::NetPrefix,
    op: Opcode,
    to: u16,
    other: u16,
    epoch: u32,
    operand1: u64,
    patience: std::time::Duration,
) -> Result<(), ClientError> {
    let start = std::time::Instant::now();
    loop {
        let mut r = Request::new(op, RemoteAddr::host_op(prefix, HostId(to), op));
        r.operand0 = u64::from(other);
        r.operand1 = operand1;
        r.lease = u64::from(epoch);
        let id = c.submit(r);
        match c.wait(id) {
            Err(ClientError::Busy) if start.elapsed() < patience => {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            other => return other.map(|_| ()),
        }
    }
}

/// Replication's work for one round (docs/switch.md "Replication"): the backups of hosts
/// declared dead take over (PROMOTE, then the switch's routes move), the holders whose
/// backup died stop waiting for it (BACKUP to nobody), and hosts that want a backup get one
/// (REPLICA to the backup, BACKUP to the host). The state's lock is not held while orders
/// travel.
pub fn replication_round(ctl: &Mutex<Controller>) -> Result<(), CtlError> {
    let (failovers, link, prefix) = {
        let mut c = lock(ctl);
        (c.plan_failovers(), c.link(), c.prefix())
    };
    let mut stops = Vec::new();
    for p in failovers {
        let t = std::time::Instant::now();
        let r = {
            let mut l = link.lock().unwrap_or_else(PoisonError::into_inner);
            match l.as_mut() {
                Some(c) => order(
                    c,
                    prefix,
                    Opcode::PROMOTE,
                    p.to,
                    p.host,
                    p.epoch,
                    0,
                    std::time::Duration::from_secs(2),
                ),
                None => Err(ClientError::Invalid("no link")),
            }
        };
        let promote_us = t.elapsed().as_secs_f64() * 1e6;
        let mut c = lock(ctl);
        match r {
            Ok(()) => stops.extend(c.finish_failover(&p, promote_us)?),
            Err(e) => c.abandon_failover(&p, &format!("PROMOTE at host {}: {e}", p.to))?,
        }
    }
    for id in stops {
        let r = {
            let mut l = link.lock().unwrap_or_else(PoisonError::into_inner);
            l.as_mut().map(|c| {
                order(
                    c,
                    prefix,
                    Opcode::BACKUP,
                    id,
                    0,
                    0,
                    0,
                    std::time::Duration::from_millis(100),
                )
            })
        };
        lock(ctl).stream_stopped(id, matches!(r, Some(Ok(()))));
    }
    let (pairings, rate) = {
        let mut c = lock(ctl);
        (c.plan_pairings(), c.copy_rate())
    };
    for p in pairings {
        let r = {
            let mut l = link.lock().unwrap_or_else(PoisonError::into_inner);
            match l.as_mut() {
                Some(c) => {
                    let patience = std::time::Duration::from_millis(100);
                    let (host, backup, e) = (p.host, p.backup, p.epoch);
                    order(c, prefix, Opcode::REPLICA, backup, host, e, 0, patience)
                        .map_err(|e| format!("REPLICA at host {backup}: {e}"))
                        .and_then(|()| {
                            order(c, prefix, Opcode::BACKUP, host, backup, e, rate, patience)
                                .map_err(|e| format!("BACKUP at host {host}: {e}"))
                        })
                }
                None => Err("no link".into()),
            }
        };
        lock(ctl).finish_pairing(&p, r);
    }
    Ok(())
}

/// Invalidation: the pages the switch saw freed leave the routing state, and every registered
/// client link gets an INVALIDATE notice per page, after which its client fails requests for
/// the page at once. Returns how many pages.
pub fn drain_freed(ctl: &Mutex<Controller>) -> Result<usize, CtlError> {
    let (notices, link) = {
        let mut c = lock(ctl);
        (c.take_freed()?, c.link())
    };
    if !notices.pages.is_empty() {
        let mut c = link.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = c.as_mut() {
            send_notices(c, &notices);
        }
    }
    Ok(notices.pages.len())
}

fn send_notices(c: &mut Client<AnyTransport>, n: &Notices) {
    use bluebridge_proto::frame::{Endpoints, build};
    use bluebridge_proto::{BbRepr, FRAME_OVERHEAD, UDP_PORT};

    let (Some(port_mac), Some(x)) = (n.port_mac, c.transport_mut().xdp_mut()) else {
        return;
    };
    let src = RemoteAddr::host_op(n.prefix, CONTROLLER_HOST, Opcode::INVALIDATE).to_ipv6();
    let h = BbRepr {
        flags: HeaderFlags::REPLY,
        count: 1,
        ..BbRepr::default()
    };
    for &page in &n.pages {
        for &dst in &n.clients {
            let ep = Endpoints {
                src_mac: MacAddr(x.mac()),
                dst_mac: MacAddr(port_mac),
                src,
                dst,
                src_port: UDP_PORT,
                dst_port: 40000,
            };
            let mut frame = [0u8; FRAME_OVERHEAD + 16];
            if build(&mut frame, &ep, &h, &page.octets()).is_ok() && !x.send_raw(&frame) {
                tracing::warn!(%page, client = %dst, "no room to send an INVALIDATE notice");
            }
        }
    }
}

/// Moves `page` (an address, any opcode) to host `to` while clients keep using the same
/// address: the holder freezes it and hands it over (from then on it answers MOVED, which
/// clients retry), `to` adopts it, and the switch routes the page's /112 to `to` (or drops
/// that route when the page comes home). Nothing acknowledged is lost: a write the holder
/// acknowledged is in the copy, one it answered MOVED is retried at `to`. One migration of a
/// page at a time; the controller's state stays available meanwhile.
pub fn migrate(ctl: &Mutex<Controller>, page: &str, to: u16) -> Result<Migration, CtlError> {
    let (plan, link) = {
        let mut c = lock(ctl);
        (c.plan_migration(page, to)?, c.link())
    };
    let t0 = std::time::Instant::now();
    let copied = {
        let mut c = link.lock().unwrap_or_else(PoisonError::into_inner);
        match c.as_mut() {
            Some(c) => copy(c, &plan),
            None => Err(CtlError::Invalid("the controller lost its link".into())),
        }
    };
    let (t1, t2) = match copied {
        Ok(t) => t,
        Err(e) => {
            lock(ctl).abandon_migration(&plan);
            return Err(e);
        }
    };
    {
        let mut c = lock(ctl);
        c.finish_migration(&plan)?;
        c.release()?;
    }
    let t3 = std::time::Instant::now();
    let us = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e6;
    let key: Ipv6Addr = plan.key;
    tracing::info!(page = %key, from = plan.from, to, cutover_us = us(t0, t3), "page migrated");
    Ok(Migration {
        page: key.to_string(),
        from: plan.from,
        to,
        copy_out_us: us(t0, t1),
        copy_in_us: us(t1, t2),
        route_update_us: us(t2, t3),
        cutover_us: us(t0, t3),
    })
}

/// How long a migration waits for the page's copies and leases to go (the longest copy lease
/// a server grants is 60 s; the default 1 s).
const MIGRATE_COPY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// MIGRATE_OUT from the holder, MIGRATE_IN at the destination (given back to the holder if
/// that fails); returns when each finished.
fn copy(
    c: &mut Client<AnyTransport>,
    plan: &MigrationPlan,
) -> Result<(std::time::Instant, std::time::Instant), CtlError> {
    let fail = |what: &str, e: ClientError| CtlError::Invalid(format!("{what}: {e}"));
    // Both steps may be repeated (MIGRATE_OUT is idempotent, a repeated MIGRATE_IN refreshes
    // the adopted copy), so a slow host gets more than one retry budget: a freeze whose
    // answer was lost must not leave the page frozen.
    // A page with coherent copies (or mid-update) is answered LEASE_HELD while its home
    // revokes them (§5.18): asked again for up to MIGRATE_COPY_WAIT, so the page moves with
    // no copies left behind and its directory starts afresh at the new home.
    let call = |c: &mut Client<AnyTransport>, r: Request| {
        let mut tries = 0;
        let start = std::time::Instant::now();
        loop {
            let id = c.submit(r.clone());
            match c.wait(id) {
                Err(ClientError::Timeout { .. }) if tries < 4 => tries += 1,
                Err(ClientError::LeaseHeld) if start.elapsed() < MIGRATE_COPY_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                other => return other,
            }
        }
    };
    // Sent to the holder's own address, naming the page: the page's address leads wherever the
    // fabric routes it, and on a BGP fabric that can still be a former holder whose frozen
    // (older) copy would be taken for the page while the real holder stayed live.
    let mut freeze = Request::new(
        Opcode::MIGRATE_OUT,
        RemoteAddr::host_op(plan.prefix, HostId(plan.from), Opcode::MIGRATE_OUT),
    )
    .range(0, PAGE_SIZE as u16);
    freeze.count = plan.home;
    freeze.lease = plan.page.handle().to_bits();
    let out = call(c, freeze).map_err(|e| fail("MIGRATE_OUT", e))?;
    let t1 = std::time::Instant::now();
    let adopt = |c: &mut Client<AnyTransport>, host: u16| {
        let mut r = Request::new(
            Opcode::MIGRATE_IN,
            RemoteAddr::host_op(plan.prefix, HostId(host), Opcode::MIGRATE_IN),
        )
        .range(0, PAGE_SIZE as u16)
        .payload(out.data.clone());
        r.count = plan.home;
        r.lease = plan.page.handle().to_bits();
        r.operand0 = out.header.operand0;
        r.operand1 = out.header.operand1;
        if out.header.flags.contains(HeaderFlags::SHARED) {
            r.flags = HeaderFlags::SHARED;
        }
        call(c, r)
    };
    if let Err(e) = adopt(c, plan.to) {
        // Give it back to its holder (unfrozen at home, or re-adopted where it was).
        if let Err(e2) = adopt(c, plan.from) {
            tracing::error!(error = %e2, page = %plan.key, "could not give a page back after a failed migration");
        }
        return Err(fail("MIGRATE_IN", e));
    }
    Ok((t1, std::time::Instant::now()))
}

/// Runs `f` on the controller's link for registered host `id` (the lock is not held meanwhile).
fn on_host<R>(
    ctl: &Mutex<Controller>,
    id: u16,
    what: &str,
    f: impl FnOnce(&mut Client<AnyTransport>) -> Result<R, ClientError>,
) -> Result<R, CtlError> {
    let link = {
        let c = lock(ctl);
        if !c.hosts().iter().any(|h| h.id == id) {
            return Err(CtlError::Invalid(format!("host {id} is not registered")));
        }
        c.link()
    };
    let mut c = link.lock().unwrap_or_else(PoisonError::into_inner);
    let c = c
        .as_mut()
        .ok_or_else(|| CtlError::Invalid("the controller has no link to the hosts".into()))?;
    f(c).map_err(|e| CtlError::Invalid(format!("{what} on host {id}: {e}")))
}

/// Who holds pages on host `id`, shard by shard, and how long each has been silent
/// (OWNERS, docs/protocol.md §5.17).
pub fn owners(ctl: &Mutex<Controller>, id: u16) -> Result<Vec<OwnerInfo>, CtlError> {
    let list = on_host(ctl, id, "OWNERS", |c| c.owners(HostId(id)))?;
    Ok(list
        .into_iter()
        .map(|o| OwnerInfo {
            shard: o.shard,
            addr: o.addr.to_string(),
            pages: o.pages,
            silent_ms: o.silent_ms,
        })
        .collect())
}

/// Frees every page `owner` holds on host `id`, shared and detached ones included (RECLAIM,
/// docs/protocol.md §5.17).
pub fn reclaim(ctl: &Mutex<Controller>, id: u16, owner: &str) -> Result<Reclaimed, CtlError> {
    let addr: Ipv6Addr = owner
        .parse()
        .map_err(|_| CtlError::Invalid(format!("`{owner}` is not an IPv6 address")))?;
    let pages = on_host(ctl, id, "RECLAIM", |c| c.reclaim(HostId(id), addr))?;
    tracing::info!(host = id, owner = %addr, pages, "owner's pages reclaimed");
    Ok(Reclaimed {
        host: id,
        owner: addr.to_string(),
        pages,
    })
}
