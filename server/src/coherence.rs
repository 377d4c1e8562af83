//! The page directory of coherent copies (docs/protocol.md §5.18): for every page of a shard,
//! who holds a copy of it — one writer or any number of readers — and the copies'
//! generation; for the shard, the clients that hold copies and how long their copy leases
//! run.
//!
//! Pure bookkeeping: the handler asks for a decision (grant, or revoke these holders and
//! answer RECALLING), sends the notices itself and moves the bytes. Every table is sized when
//! the shard starts: 16 bytes per page, [`MAX_HOLDERS`] clients.
//!
//! Holders are bits of a 64-bit mask naming entries of the client table. A client's entry
//! lives as long as its copy lease: any GET, PUT or RENEW from it renews the lease, and a
//! holder whose lease has run out counts as gone (its copies are void by the client's own
//! rules, which make it stop using them before the server's lease ends). An entry whose lease
//! ran out may be given to another client; the bits it left in pages then name the newcomer,
//! which only costs the newcomer REVOKE notices for copies it does not hold (it answers them
//! at once): a holder set may be too large, never too small.

use bluebridge_proto::message::{KEEP_NONE, KEEP_READ, KEEP_WRITE};
use bluebridge_proto::{MacAddr, Status};

use crate::lease::ClientKey;
use crate::store::PageIdx;

/// Clients that may hold copies of one shard's pages at once.
pub const MAX_HOLDERS: usize = 64;
/// Client-table entries one address may take (its ports: processes), so one host cannot take
/// the whole table.
pub const MAX_HOLDERS_PER_ADDRESS: usize = 8;
/// Copy lease when none is configured, ms.
pub const DEFAULT_COPY_LEASE_MS: u64 = 1_000;
/// The shortest and the longest copy lease a shard grants, ms.
pub const MIN_COPY_LEASE_MS: u64 = 100;
/// See [`MIN_COPY_LEASE_MS`].
pub const MAX_COPY_LEASE_MS: u64 = 60_000;
/// Pages of a shard held back for migration at once (more wait their turn: the controller
/// asks again).
pub const MAX_MIGRATING: usize = 64;

/// The top bit of a page's generation word: the holder is the writer.
const WRITER: u32 = 1 << 31;
const GEN_MASK: u32 = WRITER - 1;

/// One page's directory entry.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Entry {
    /// Client-table entries holding a copy.
    holders: u64,
    /// The copies' generation (bits 0..31; never 0) and [`WRITER`].
    word: u32,
    /// Bits 0..16: when revocation for a writer began (ms since start mod 2^16, | 1 so never
    /// 0), or 0: while it lasts (until that writer has the page, at most one copy lease) no
    /// copy goes to anyone else, so neither readers nor other writers can starve it. Bits
    /// 16..23: the client-table entry + 1 of the first requester turned away meanwhile (0:
    /// none), whose turn comes next; bit 23: it wants the write copy. Bits 24..32: the
    /// client-table entry + 1 of the requester answered RECALLING (0: none) — the writer the
    /// drain is for, or a reader waiting for a writer to downgrade — told READY when the
    /// copies in its way are gone.
    drain: u32,
}

const DRAIN_MASK: u32 = (1 << 16) - 1;
const NEXT_SHIFT: u32 = 16;
const NEXT_MASK: u32 = 0x7f << NEXT_SHIFT;
const NEXT_WRITER: u32 = 1 << 23;

const _: () = assert!(size_of::<Entry>() == 16);
// The drain's clock must not wrap within the longest copy lease.
const _: () = assert!(MAX_COPY_LEASE_MS < DRAIN_MASK as u64);

impl Entry {
    fn generation(&self) -> u32 {
        self.word & GEN_MASK
    }

    fn has_writer(&self) -> bool {
        self.word & WRITER != 0
    }

    /// Starts a new generation: `writer` or readers.
    fn next_gen(&mut self, writer: bool) {
        let g = (self.generation() % GEN_MASK) + 1;
        self.word = g | if writer { WRITER } else { 0 };
    }

    fn drain_ms(&self) -> u32 {
        self.drain & DRAIN_MASK
    }

    fn start_drain(&mut self, now_ns: u64) {
        self.drain = (self.drain & !DRAIN_MASK) | (((now_ns / 1_000_000) as u32 & DRAIN_MASK) | 1);
    }

    fn waiter(&self) -> Option<usize> {
        match self.drain >> 24 {
            0 => None,
            w => Some(w as usize - 1),
        }
    }

    fn set_waiter(&mut self, i: Option<usize>) {
        let w = i.map_or(0, |i| i as u32 + 1);
        self.drain = (self.drain & !(0xff << 24)) | (w << 24);
    }

    /// The requester whose turn comes after the drain's writer, and whether it wants the
    /// write copy.
    fn next(&self) -> Option<(usize, bool)> {
        match (self.drain & NEXT_MASK) >> NEXT_SHIFT {
            0 => None,
            n => Some((n as usize - 1, self.drain & NEXT_WRITER != 0)),
        }
    }

    /// `i` was turned away by a drain: its turn comes next unless another's already does.
    fn queue_next(&mut self, i: usize, writer: bool) {
        if self.next().is_none() {
            self.drain |= ((i as u32 + 1) << NEXT_SHIFT) | if writer { NEXT_WRITER } else { 0 };
        }
    }

    /// Nothing but empty state: no copies, no drain, no waiter.
    fn clear(&mut self) {
        self.holders = 0;
        self.drain = 0;
    }
}

/// A client that holds (or held) copies.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Holder {
    key: ClientKey,
    /// Its MAC and the one it sent to (where notices go on a link).
    mac: MacAddr,
    our_mac: MacAddr,
    /// When its copy lease ends, ns; 0: the entry is free.
    expires_ns: u64,
}

/// Where a REVOKE notice goes.
#[derive(Debug, Clone, Copy)]
pub struct NoticeTo {
    /// The holder's endpoint.
    pub key: ClientKey,
    /// Its MAC (the next hop towards it).
    pub mac: MacAddr,
    /// The MAC it sent its requests to (the notice's source MAC).
    pub our_mac: MacAddr,
}

/// The answer to a GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Get {
    /// The copy is the requester's: its generation, and whether the reply carries the bytes
    /// (not when the requester's read copy is current: an upgrade).
    Granted {
        /// The copy's generation.
        generation: u32,
        /// Send the range.
        data: bool,
        /// Someone was turned away while the requester waited: right after the reply, the
        /// requester is sent REVOKE (this generation), so the page goes on to the next once
        /// the requester has had its turn (its client keeps a new copy a little while before
        /// it answers, §5.18).
        hand_on: Option<HandOn>,
    },
    /// Other copies must go first: notices to `revoke` (a mask of client-table entries,
    /// which may be 0 while a revocation already under way runs its course), each told it
    /// may keep `keep`; answer RECALLING.
    Recall {
        /// Holders to send REVOKE.
        revoke: u64,
        /// What they may keep ([`KEEP_NONE`] or [`KEEP_READ`]).
        keep: u64,
        /// The generation revoked.
        generation: u32,
    },
}

/// A REVOKE to send the requester of a granted copy right after the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandOn {
    /// The requester (a mask for [`Directory::notice_targets`]).
    pub to: u64,
    /// What it may keep ([`KEEP_NONE`] or [`KEEP_READ`]).
    pub keep: u64,
}

/// The directory of one shard.
#[derive(Debug)]
pub struct Directory {
    entries: Vec<Entry>,
    holders: [Holder; MAX_HOLDERS],
    lease_ns: u64,
    /// Pages the controller wants to migrate that still had copies, and until when (ns) no
    /// copy of them is granted, so their holders' copies drain instead of being taken again.
    migrating: Vec<(PageIdx, u64)>,
}

/// The directory as a replica's snapshot carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct DirectoryState {
    entries: Vec<Entry>,
    holders: Vec<Holder>,
    migrating: Vec<(PageIdx, u64)>,
}

impl Directory {
    /// The directory, for a replica's snapshot (§5.19).
    pub(crate) fn state(&self) -> DirectoryState {
        DirectoryState {
            entries: self.entries.clone(),
            holders: self.holders.to_vec(),
            migrating: self.migrating.clone(),
        }
    }

    /// Takes a snapshot's directory; `false` if it is not one of this size.
    pub(crate) fn set_state(&mut self, s: DirectoryState) -> bool {
        if s.entries.len() != self.entries.len() || s.holders.len() != self.holders.len() {
            return false;
        }
        self.entries = s.entries;
        self.holders.copy_from_slice(&s.holders);
        self.migrating = s.migrating;
        true
    }

    /// A directory for `pages` pages granting copy leases of `lease_ms`.
    pub fn new(pages: usize, lease_ms: u64) -> Self {
        let free = Holder {
            key: ClientKey {
                addr: [0; 16],
                port: 0,
            },
            mac: MacAddr([0; 6]),
            our_mac: MacAddr([0; 6]),
            expires_ns: 0,
        };
        Directory {
            entries: vec![
                Entry {
                    holders: 0,
                    word: 1,
                    drain: 0
                };
                pages
            ],
            holders: [free; MAX_HOLDERS],
            lease_ns: lease_ms.clamp(1, MAX_COPY_LEASE_MS) * 1_000_000,
            migrating: Vec::with_capacity(MAX_MIGRATING),
        }
    }

    /// The copy lease, ms.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ns / 1_000_000
    }

    /// Bytes the directory takes.
    pub fn bytes(&self) -> usize {
        self.entries.len() * size_of::<Entry>() + size_of::<Self>()
    }

    /// Client-table entries whose lease runs now.
    fn live(&self, now_ns: u64) -> u64 {
        let mut m = 0;
        for (i, h) in self.holders.iter().enumerate() {
            if h.expires_ns > now_ns {
                m |= 1 << i;
            }
        }
        m
    }

    /// Clients holding live copy leases now.
    pub fn clients(&self, now_ns: u64) -> u32 {
        self.live(now_ns).count_ones()
    }

    fn find(&self, who: ClientKey) -> Option<usize> {
        self.holders
            .iter()
            .position(|h| h.expires_ns != 0 && h.key == who)
    }

    /// The requester's entry, renewed (registered if new). BUSY when every entry is live, or
    /// its address already has [`MAX_HOLDERS_PER_ADDRESS`] live ones.
    fn register(
        &mut self,
        who: ClientKey,
        macs: (MacAddr, MacAddr),
        now_ns: u64,
    ) -> Result<usize, Status> {
        let i = match self.find(who) {
            Some(i) => i,
            None => {
                let same_addr = self
                    .holders
                    .iter()
                    .filter(|h| h.expires_ns > now_ns && h.key.addr == who.addr)
                    .count();
                if same_addr >= MAX_HOLDERS_PER_ADDRESS {
                    return Err(Status::BUSY);
                }
                // A free entry first, else the one whose lease ran out longest ago.
                let (i, h) = self
                    .holders
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, h)| h.expires_ns)
                    .expect("entries");
                if h.expires_ns > now_ns {
                    return Err(Status::BUSY);
                }
                self.holders[i].key = who;
                i
            }
        };
        let h = &mut self.holders[i];
        (h.mac, h.our_mac) = macs;
        h.expires_ns = now_ns + self.lease_ns;
        Ok(i)
    }

    /// Where REVOKE notices for the holders in `mask` go.
    pub fn notice_targets(&self, mask: u64) -> impl Iterator<Item = NoticeTo> + '_ {
        (0..MAX_HOLDERS)
            .filter(move |i| mask & (1 << i) != 0)
            .map(|i| {
                let h = &self.holders[i];
                NoticeTo {
                    key: h.key,
                    mac: h.mac,
                    our_mac: h.our_mac,
                }
            })
    }

    fn draining(&self, e: &Entry, now_ns: u64) -> bool {
        e.drain_ms() != 0
            && ((now_ns / 1_000_000) as u32).wrapping_sub(e.drain_ms()) & DRAIN_MASK
                < self.lease_ms() as u32
    }

    /// Whether page `p` drains for a writer now; a drain over (its lease passed without the
    /// writer coming back for the page) is forgotten, so its 16-bit clock cannot wrap into a
    /// false one later.
    fn draining_now(&mut self, p: PageIdx, now_ns: u64) -> bool {
        let e = self.entries[p.0 as usize];
        let draining = self.draining(&e, now_ns);
        if !draining && e.drain_ms() != 0 {
            self.entries[p.0 as usize].drain = 0;
        }
        draining
    }

    /// What every GET starts with: the requester's client-table entry (registered or
    /// renewed), the live entries, and whether the page drains for a writer — or the answer
    /// for a page held back for migration.
    fn ask(
        &mut self,
        p: PageIdx,
        who: ClientKey,
        macs: (MacAddr, MacAddr),
        now_ns: u64,
    ) -> Result<Result<(usize, u64, bool), Get>, Status> {
        let i = self.register(who, macs, now_ns)?;
        if let Some(held) = self.held_for_migration(p, now_ns) {
            return Ok(Err(held));
        }
        Ok(Ok((i, self.live(now_ns), self.draining_now(p, now_ns))))
    }

    /// GET_SHARED: a read copy for `who`, who holds none.
    pub fn get_shared(
        &mut self,
        p: PageIdx,
        who: ClientKey,
        macs: (MacAddr, MacAddr),
        now_ns: u64,
    ) -> Result<Get, Status> {
        let (i, live, draining) = match self.ask(p, who, macs, now_ns)? {
            Ok(a) => a,
            Err(held) => return Ok(held),
        };
        let e = &mut self.entries[p.0 as usize];
        let me = 1u64 << i;
        if e.holders & me != 0 {
            // It says it holds nothing (a new process on the same endpoint, or a copy it
            // gave up): what the directory had for it goes.
            if e.has_writer() {
                e.holders = 0;
                e.next_gen(false);
            } else {
                e.holders &= !me;
            }
        }
        if draining && e.waiter().is_some_and(|w| live & (1 << w) != 0) {
            // A writer waits for the page (its way being cleared): readers wait behind it.
            e.queue_next(i, false);
            return Ok(Get::Recall {
                revoke: 0,
                keep: KEEP_NONE,
                generation: e.generation(),
            });
        }
        if e.has_writer() {
            if e.holders & live != 0 {
                e.set_waiter(Some(i));
                return Ok(Get::Recall {
                    revoke: e.holders & live,
                    keep: KEEP_READ,
                    generation: e.generation(),
                });
            }
            // The writer's lease ran out: its copy is void.
            e.holders = 0;
            e.next_gen(false);
        }
        e.holders = (e.holders & live) | me;
        e.drain = 0;
        Ok(Get::Granted {
            generation: e.generation(),
            data: true,
            hand_on: None,
        })
    }

    /// GET_EXCLUSIVE: the write copy for `who`, who holds the read copy of generation `held`
    /// (0: none).
    pub fn get_exclusive(
        &mut self,
        p: PageIdx,
        who: ClientKey,
        macs: (MacAddr, MacAddr),
        held: u64,
        now_ns: u64,
    ) -> Result<Get, Status> {
        let (i, live, draining) = match self.ask(p, who, macs, now_ns)? {
            Ok(a) => a,
            Err(held) => return Ok(held),
        };
        let e = &mut self.entries[p.0 as usize];
        let me = 1u64 << i;
        if draining && e.waiter().is_some_and(|w| w != i && live & (1 << w) != 0) {
            // The way is being cleared for another writer: this one waits its turn, or the
            // writer that just gave the page up would take it back before the waiter, woken
            // by READY, asks again (a ping-pong that starves it).
            e.queue_next(i, true);
            return Ok(Get::Recall {
                revoke: 0,
                keep: KEEP_NONE,
                generation: e.generation(),
            });
        }
        let others = e.holders & live & !me;
        if others != 0 {
            if !draining {
                e.drain = 0; // whatever an old drain left
                e.start_drain(now_ns);
            }
            e.set_waiter(Some(i));
            return Ok(Get::Recall {
                revoke: others,
                keep: KEEP_NONE,
                generation: e.generation(),
            });
        }
        let current = e.holders & me != 0 && held != 0 && held == u64::from(e.generation());
        let next = e
            .next()
            .filter(|&(n, _)| draining && n != i && live & (1 << n) != 0);
        if !(e.has_writer() && e.holders == me) {
            e.next_gen(true);
        }
        e.clear();
        e.holders = me;
        // The first one turned away while this writer waited goes next: it waits for the
        // page (a writer drains it), told READY when this writer gives it up.
        let hand_on = next.map(|(n, writer)| {
            e.set_waiter(Some(n));
            if writer {
                e.start_drain(now_ns);
            }
            HandOn {
                to: me,
                keep: if writer { KEEP_NONE } else { KEEP_READ },
            }
        });
        Ok(Get::Granted {
            generation: e.generation(),
            data: !current,
            hand_on,
        })
    }

    /// PUT from `who` about its copy of generation `copy`: it keeps `keep`; `data` says whether
    /// the request carries bytes (which the caller writes only on `Ok`). Returns the
    /// generation of the copy it keeps (a downgraded writer's read copy starts a new one) and
    /// the client-table entries to tell READY (a waiter whose way is now clear).
    pub fn put(
        &mut self,
        p: PageIdx,
        who: ClientKey,
        copy: u64,
        keep: u64,
        data: bool,
        now_ns: u64,
    ) -> Result<(u32, u64), Status> {
        let idx = self.find(who);
        if let Some(i) = idx {
            // Heard from: its lease goes on (the entry is the same, so are its bits).
            self.holders[i].expires_ns = now_ns + self.lease_ns;
        }
        let e = &mut self.entries[p.0 as usize];
        let holder =
            idx.filter(|&i| e.holders & (1 << i) != 0 && copy == u64::from(e.generation()));
        let Some(i) = holder else {
            // Not a copy the directory knows (revoked, lease run out, never granted): a pure
            // release has nothing to do; bytes or a kept copy are refused.
            return if data || keep != KEEP_NONE {
                Err(Status::LEASE_EXPIRED)
            } else {
                Ok((e.generation(), 0))
            };
        };
        let me = 1u64 << i;
        if !e.has_writer() {
            if data || keep == KEEP_WRITE {
                return Err(Status::LEASE_INVALID); // a reader writes nothing
            }
            if keep == KEEP_NONE {
                e.holders &= !me;
            }
        } else {
            match keep {
                KEEP_WRITE => return Ok((e.generation(), 0)),
                KEEP_READ => {
                    e.next_gen(false);
                    e.holders = me;
                }
                _ => {
                    e.next_gen(false);
                    e.holders = 0;
                }
            }
        }
        let generation = e.generation();
        let live = self.live(now_ns);
        let e = &mut self.entries[p.0 as usize];
        // The waiter's way is clear when no live writer is left (a reader was waiting) and,
        // while draining for a writer, no live copy but its own.
        let ready = e.waiter().filter(|&w| {
            let others = e.holders & live & !(1u64 << w);
            others == 0 || (!e.has_writer() && e.drain_ms() == 0)
        });
        // A drain goes on, and its writer stays the waiter, until that writer has the page
        // (or one copy lease has passed): were it to end here, a reader spinning on the page
        // would take a new copy before the writer, woken by READY, asks again — and starve
        // it. A reader waiting for a writer's downgrade is told once.
        if ready.is_some() && e.drain_ms() == 0 {
            e.set_waiter(None);
        }
        Ok((generation, ready.map_or(0, |w| 1u64 << w)))
    }

    /// RENEW: `who`'s copy lease goes on. LEASE_EXPIRED if it has no entry (its lease ran out
    /// and the entry went to another client): its copies are void.
    pub fn renew(&mut self, who: ClientKey, now_ns: u64) -> Result<(), Status> {
        let i = self.find(who).ok_or(Status::LEASE_EXPIRED)?;
        self.holders[i].expires_ns = now_ns + self.lease_ns;
        Ok(())
    }

    /// Whether any live copy of the page exists: then the plain writes (WRITE, CAS, FREE,
    /// UPDATE, migration) must wait (LEASE_HELD). A page whose copies are all void starts a
    /// new generation, so no old copy can be taken for current after the write.
    pub fn check_plain_write(&mut self, p: PageIdx, now_ns: u64) -> Result<(), Status> {
        let live = self.live(now_ns);
        let e = &mut self.entries[p.0 as usize];
        if e.holders & live != 0 {
            return Err(Status::LEASE_HELD);
        }
        if e.holders != 0 {
            e.holders = 0;
            e.next_gen(false);
        }
        Ok(())
    }

    /// The page's live holders (a mask for [`Directory::notice_targets`]) and their copies'
    /// generation.
    pub fn live_holders(&self, p: PageIdx, now_ns: u64) -> (u64, u32) {
        let e = &self.entries[p.0 as usize];
        (e.holders & self.live(now_ns), e.generation())
    }

    /// MIGRATE_OUT met live copies of `p`: until the page leaves, or one copy lease after the
    /// controller last asked, no copy of it is granted (GETs are answered RECALLING), so the
    /// holders told to give theirs up are not replaced by new ones and the migration cannot
    /// starve. With [`MAX_MIGRATING`] pages held already, `p` waits its turn.
    pub fn hold_for_migration(&mut self, p: PageIdx, now_ns: u64) {
        let until = now_ns + self.lease_ns;
        self.migrating.retain(|&(_, u)| u > now_ns);
        if let Some(m) = self.migrating.iter_mut().find(|(q, _)| *q == p) {
            m.1 = until;
        } else if self.migrating.len() < MAX_MIGRATING {
            self.migrating.push((p, until));
        }
    }

    /// The answer to a GET of a page held back for migration: RECALLING (the holders were
    /// told already), or `None`.
    fn held_for_migration(&self, p: PageIdx, now_ns: u64) -> Option<Get> {
        if self.migrating.is_empty() {
            return None;
        }
        self.migrating
            .iter()
            .any(|&(q, u)| q == p && u > now_ns)
            .then(|| Get::Recall {
                revoke: 0,
                keep: KEEP_NONE,
                generation: self.entries[p.0 as usize].generation(),
            })
    }

    /// `p` left (migrated, freed, or came back): it is held back no more.
    fn release(&mut self, p: PageIdx) {
        if !self.migrating.is_empty() {
            self.migrating.retain(|&(q, _)| q != p);
        }
    }

    /// The page left by migration: no copies (there were none), not held back.
    pub fn migrated_out(&mut self, p: PageIdx) {
        self.release(p);
        self.entries[p.0 as usize].clear();
    }

    /// The page arrived by migration (adopted, or back home): no copies, and a generation
    /// drawn from `salt` (the time) rather than continued, so no copy or PUT from the page's
    /// previous homes can be taken for one of this home's.
    pub fn restart(&mut self, p: PageIdx, salt: u64) {
        self.release(p);
        let mixed = (salt ^ u64::from(p.0).rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let e = &mut self.entries[p.0 as usize];
        e.clear();
        e.word = ((mixed >> 33) as u32 % GEN_MASK) + 1;
    }

    /// The page was freed: no copies, a new generation.
    pub fn reset(&mut self, p: PageIdx) {
        self.release(p);
        let e = &mut self.entries[p.0 as usize];
        e.clear();
        e.next_gen(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ClientKey {
        let mut addr = [0xfd; 16];
        addr[15] = n;
        ClientKey { addr, port: 40000 }
    }

    const MACS: (MacAddr, MacAddr) = (MacAddr([2; 6]), MacAddr([4; 6]));
    const MS: u64 = 1_000_000;
    const P: PageIdx = PageIdx(3);

    fn granted(g: Result<Get, Status>) -> (u32, bool) {
        match g {
            Ok(Get::Granted {
                generation, data, ..
            }) => (generation, data),
            other => panic!("not granted: {other:?}"),
        }
    }

    #[test]
    fn readers_share_a_writer_is_alone() {
        let mut d = Directory::new(8, 1000);
        let (g, data) = granted(d.get_shared(P, key(1), MACS, 0));
        assert!(data);
        assert_eq!(granted(d.get_shared(P, key(2), MACS, 0)).0, g);
        // A writer revokes both readers and waits.
        let Ok(Get::Recall {
            revoke,
            keep,
            generation,
        }) = d.get_exclusive(P, key(3), MACS, 0, MS)
        else {
            panic!()
        };
        assert_eq!((revoke.count_ones(), keep, generation), (2, KEEP_NONE, g));
        // New readers wait while it drains.
        assert!(matches!(
            d.get_shared(P, key(4), MACS, 2 * MS),
            Ok(Get::Recall { revoke: 0, .. })
        ));
        // One reader gone: the writer's way is not clear yet.
        assert_eq!(
            d.put(P, key(1), u64::from(g), KEEP_NONE, false, 3 * MS),
            Ok((g, 0))
        );
        assert!(matches!(
            d.get_exclusive(P, key(3), MACS, 0, 4 * MS),
            Ok(Get::Recall { .. })
        ));
        // The last one: the waiting writer (entry 2) is told READY.
        assert_eq!(
            d.put(P, key(2), u64::from(g), KEEP_NONE, false, 5 * MS),
            Ok((g, 1 << 2))
        );
        let (w, data) = granted(d.get_exclusive(P, key(3), MACS, 0, 6 * MS));
        assert!(data && w != g);
        // A reader now recalls the writer, which keeps a read copy of a new generation.
        let Ok(Get::Recall {
            keep, generation, ..
        }) = d.get_shared(P, key(1), MACS, 7 * MS)
        else {
            panic!()
        };
        assert_eq!((keep, generation), (KEEP_READ, w));
        let (r, ready) = d
            .put(P, key(3), u64::from(w), KEEP_READ, true, 8 * MS)
            .unwrap();
        assert_ne!(r, w);
        assert_eq!(ready, 1 << 0, "the waiting reader is told READY");
        assert_eq!(granted(d.get_shared(P, key(1), MACS, 9 * MS)).0, r);
    }

    #[test]
    fn an_upgrade_of_a_current_copy_carries_no_bytes() {
        let mut d = Directory::new(8, 1000);
        let (g, _) = granted(d.get_shared(P, key(1), MACS, 0));
        let (w, data) = granted(d.get_exclusive(P, key(1), MACS, u64::from(g), MS));
        assert!(!data && w != g);
        // A stale generation (or 0) gets the bytes.
        let mut d = Directory::new(8, 1000);
        granted(d.get_shared(P, key(1), MACS, 0));
        assert!(granted(d.get_exclusive(P, key(1), MACS, 0, MS)).1);
    }

    #[test]
    fn stale_puts_change_nothing() {
        let mut d = Directory::new(8, 1000);
        let (w, _) = granted(d.get_exclusive(P, key(1), MACS, 0, 0));
        // Another client's write-back, or one for an old generation: refused.
        assert_eq!(
            d.put(P, key(2), u64::from(w), KEEP_NONE, true, MS),
            Err(Status::LEASE_EXPIRED)
        );
        assert_eq!(
            d.put(P, key(1), u64::from(w) + 1, KEEP_NONE, true, MS),
            Err(Status::LEASE_EXPIRED)
        );
        // A pure release of a copy not held is fine (an answer to a notice it had no copy for).
        assert!(d.put(P, key(2), 7, KEEP_NONE, false, MS).is_ok());
        // The writer is still the writer.
        assert!(matches!(
            d.get_shared(P, key(2), MACS, 2 * MS),
            Ok(Get::Recall { .. })
        ));
        assert_eq!(d.check_plain_write(P, 2 * MS), Err(Status::LEASE_HELD));
    }

    #[test]
    fn a_silent_holder_blocks_no_longer_than_its_lease() {
        let mut d = Directory::new(8, 1000);
        granted(d.get_exclusive(P, key(1), MACS, 0, 0));
        assert!(matches!(
            d.get_exclusive(P, key(2), MACS, 0, 999 * MS),
            Ok(Get::Recall { .. })
        ));
        let (_, data) = granted(d.get_exclusive(P, key(2), MACS, 0, 1001 * MS));
        assert!(data);
        // The old writer's late write-back is refused; its renewal revives its entry but not
        // its copy.
        d.renew(key(1), 1002 * MS).unwrap();
        assert_eq!(
            d.put(P, key(1), 2, KEEP_NONE, true, 1003 * MS),
            Err(Status::LEASE_EXPIRED)
        );
        assert_eq!(d.renew(key(9), 0), Err(Status::LEASE_EXPIRED));
        // Plain writes wait for live copies, and start a new generation over void ones.
        assert_eq!(d.check_plain_write(P, 1500 * MS), Err(Status::LEASE_HELD));
        assert_eq!(d.check_plain_write(P, 5000 * MS), Ok(()));
        assert_eq!(d.live_holders(P, 5000 * MS).0, 0);
    }

    #[test]
    fn the_client_table_is_bounded_per_address_and_recycled() {
        let mut d = Directory::new(8, 1000);
        for port in 0..MAX_HOLDERS_PER_ADDRESS as u16 {
            let k = ClientKey { port, ..key(1) };
            granted(d.get_shared(P, k, MACS, 0));
        }
        let k = ClientKey { port: 99, ..key(1) };
        assert_eq!(d.get_shared(P, k, MACS, 0), Err(Status::BUSY));
        for n in 0..(MAX_HOLDERS - MAX_HOLDERS_PER_ADDRESS) as u8 {
            granted(d.get_shared(PageIdx(1), key(10 + n), MACS, 0));
        }
        assert_eq!(d.get_shared(P, key(200), MACS, 0), Err(Status::BUSY));
        assert_eq!(d.clients(0), MAX_HOLDERS as u32);
        // After the leases run out the table takes new clients.
        granted(d.get_shared(P, key(200), MACS, 2000 * MS));
        assert_eq!(d.clients(2000 * MS), 1);
    }

    #[test]
    fn a_page_held_for_migration_drains_and_is_not_granted_again() {
        let mut d = Directory::new(8, 1000);
        let (g, _) = granted(d.get_shared(P, key(1), MACS, 0));
        granted(d.get_shared(P, key(2), MACS, 0));
        // MIGRATE_OUT met the two copies: nobody gets a new one, readers or writers, while
        // the holders give theirs back.
        d.hold_for_migration(P, MS);
        for k in [key(3), key(1)] {
            assert!(matches!(
                d.get_shared(P, k, MACS, 2 * MS),
                Ok(Get::Recall { revoke: 0, .. })
            ));
        }
        assert!(matches!(
            d.get_exclusive(P, key(2), MACS, u64::from(g), 2 * MS),
            Ok(Get::Recall { revoke: 0, .. })
        ));
        // Other pages are not held.
        granted(d.get_shared(PageIdx(1), key(3), MACS, 2 * MS));
        d.put(P, key(1), u64::from(g), KEEP_NONE, false, 3 * MS)
            .unwrap();
        d.put(P, key(2), u64::from(g), KEEP_NONE, false, 3 * MS)
            .unwrap();
        assert_eq!(d.live_holders(P, 3 * MS).0, 0);
        // Once it has left, what arrives here again starts afresh and is granted.
        d.migrated_out(P);
        d.restart(P, 4 * MS);
        granted(d.get_shared(P, key(3), MACS, 4 * MS));
        // A controller that gave up holds the page back for one copy lease at most.
        d.hold_for_migration(PageIdx(2), 5 * MS);
        assert!(matches!(
            d.get_shared(PageIdx(2), key(3), MACS, 1004 * MS),
            Ok(Get::Recall { .. })
        ));
        granted(d.get_shared(PageIdx(2), key(3), MACS, 1006 * MS));
    }

    #[test]
    fn the_writer_a_drain_is_for_gets_the_page_before_anyone_else() {
        let mut d = Directory::new(8, 1000);
        let (g1, _) = granted(d.get_exclusive(P, key(1), MACS, 0, 0));
        // Writer 2 asks: writer 1 is told to give the page up, and does.
        assert!(matches!(
            d.get_exclusive(P, key(2), MACS, 0, MS),
            Ok(Get::Recall { revoke, .. }) if revoke != 0
        ));
        let (_, ready) = d
            .put(P, key(1), u64::from(g1), KEEP_NONE, true, MS)
            .unwrap();
        assert_ne!(ready, 0, "READY to writer 2");
        // Before writer 2 asks again, writer 1 and a reader want the page back: they wait.
        assert!(matches!(
            d.get_exclusive(P, key(1), MACS, 0, 2 * MS),
            Ok(Get::Recall { revoke: 0, .. })
        ));
        assert!(matches!(
            d.get_shared(P, key(3), MACS, 2 * MS),
            Ok(Get::Recall { revoke: 0, .. })
        ));
        let (g2, data) = granted(d.get_exclusive(P, key(2), MACS, 0, 3 * MS));
        assert!(data && g2 != g1);
        // Now writer 1's turn begins like any other.
        assert!(matches!(
            d.get_exclusive(P, key(1), MACS, 0, 4 * MS),
            Ok(Get::Recall { revoke, .. }) if revoke != 0
        ));
        // A waiter that vanished (its lease ran out) holds nobody up.
        granted(d.get_shared(P, key(3), MACS, 1100 * MS));
    }

    #[test]
    fn a_drain_whose_writer_never_comes_back_ends_after_a_lease_and_stays_ended() {
        let mut d = Directory::new(8, 1000);
        let (g, _) = granted(d.get_shared(P, key(1), MACS, 0));
        assert!(matches!(
            d.get_exclusive(P, key(2), MACS, 0, MS),
            Ok(Get::Recall { .. })
        ));
        d.put(P, key(1), u64::from(g), KEEP_NONE, false, 2 * MS)
            .unwrap();
        // Writer 2 keeps its lease (other pages) but never asks for this one again.
        assert!(matches!(
            d.get_shared(P, key(3), MACS, 500 * MS),
            Ok(Get::Recall { revoke: 0, .. })
        ));
        d.renew(key(2), 900 * MS).unwrap();
        granted(d.get_shared(P, key(3), MACS, 1002 * MS));
        // Nor does its 16-bit clock wrap into a drain again 65.536 s later.
        for t in [1500u64, 60_000, 65_537, 65_900] {
            d.renew(key(2), t * MS).unwrap();
            d.put(P, key(3), u64::from(g), KEEP_NONE, false, t * MS)
                .unwrap();
            granted(d.get_shared(P, key(3), MACS, t * MS + 1));
        }
    }
}
