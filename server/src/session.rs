//! At-most-once execution by client sessions (eRPC-style slots), per shard.
//!
//! A session is one client endpoint (address and UDP port). Its request ids name a slot: the low
//! [`SESSION_SLOT_BITS`] bits are the slot, the rest a sequence number that the client raises
//! every time it reuses the slot, and a client reuses a slot only once the slot's previous
//! request has completed or been given up (docs/protocol.md §8). So for every slot the server
//! keeps just the last non-idempotent request's sequence number and reply:
//! - the same sequence again is a retransmission: the stored reply is sent, nothing runs;
//! - a lower one is an old retransmission of a request the client is already done with:
//!   dropped (counted as stale), never executed;
//! - a higher one is a new request: executed once, its reply stored over the old.
//!
//! No request of one client can push out another's state, whatever the request rate: the
//! guarantee holds for as long as the session lives. Sessions are a fixed pool sized at start;
//! a session unused for [`SessionConfig::idle_ms`] may be taken over by a new client, and a new
//! client that finds no free or idle session is refused with BUSY (nothing executed), so the
//! table cannot be filled for good. Bulk replies (ALLOC_BULK handles, FREE_BULK statuses)
//! keep their payload in a shared pool with a per-session cap; a bulk request that finds no
//! room is refused with BUSY before it runs.

use std::collections::HashMap;

use bluebridge_proto::{PageHandle, SESSION_SLOT_BITS, SESSION_SLOTS, Status};

use crate::lease::ClientKey;

/// The most bytes a stored bulk payload holds (128 handles).
pub const BULK_PAYLOAD_MAX: usize = 128 * 8;

/// A stored reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredReply {
    /// Status.
    pub status: Status,
    /// The page the reply came from (ALLOC*: the first new page).
    pub handle: PageHandle,
    /// Lease id.
    pub lease: u64,
    /// operand0.
    pub operand0: u64,
    /// count.
    pub count: u16,
}

impl StoredReply {
    const EMPTY: StoredReply = StoredReply {
        status: Status::OK,
        handle: PageHandle::NONE,
        lease: 0,
        operand0: 0,
        count: 0,
    };
}

/// How the session table is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Client endpoints served at once (each takes [`SESSION_SLOTS`] slots).
    pub sessions: usize,
    /// A session unused this long may be given to a new client; a retransmission must come
    /// sooner than this after its client's previous request.
    pub idle_ms: u64,
    /// Bulk payloads stored at once, for all sessions.
    pub bulk_payloads: usize,
    /// Of those, held by one session at once.
    pub bulk_per_session: u16,
    /// Sessions one client address may hold at once (its ports beyond that get BUSY), so no
    /// one host can take every session of a shard.
    pub per_address: u16,
}

impl SessionConfig {
    /// Defaults: 512 sessions idle after 10 s, at most 64 per client address; 256 bulk
    /// payloads, 8 per session.
    pub const DEFAULT: SessionConfig = SessionConfig {
        sessions: 512,
        idle_ms: 10_000,
        bulk_payloads: 256,
        bulk_per_session: 8,
        per_address: 64,
    };
}

const NO_BULK: u16 = u16::MAX;

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Slot {
    /// Sequence number + 1 of the last request run in this slot (0: none yet).
    seq: u64,
    reply: StoredReply,
    /// Index of the bulk payload in the pool, or NO_BULK.
    bulk: u16,
    bulk_len: u16,
}

const EMPTY_SLOT: Slot = Slot {
    seq: 0,
    reply: StoredReply::EMPTY,
    bulk: NO_BULK,
    bulk_len: 0,
};

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Session {
    key: ClientKey,
    last_ns: u64,
    bulk_held: u16,
    live: bool,
}

/// Where a new request's reply goes: returned by [`Sessions::lookup`], given to
/// [`Sessions::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRef {
    slot: u32,
    seq: u64,
}

/// What the table says about a non-idempotent request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Not seen before: execute it, then [`Sessions::record`] the outcome.
    New(SlotRef),
    /// A retransmission: send this reply (and bulk payload) again, execute nothing.
    Duplicate(StoredReply, &'a [u8]),
    /// An old retransmission of a request its client has finished with: drop it.
    Stale,
    /// No session (or no bulk payload room) for it now: answer BUSY, execute nothing.
    Busy,
}

/// The session table as a replica's snapshot carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct SessionsState {
    index: HashMap<ClientKey, u32>,
    per_address: HashMap<[u8; 16], u16>,
    /// The sessions ever taken (the others are as new), with their slots.
    sessions: Vec<(u32, Session, Vec<Slot>)>,
    /// The free stack: a fresh table's never-taken sessions below `fresh_below`, then these.
    fresh_below: u32,
    free: Vec<u32>,
    hand: usize,
    /// The bulk payloads in use.
    bulk: Vec<(u16, Vec<u8>)>,
    bulk_fresh_below: u16,
    bulk_free: Vec<u16>,
}

/// A stack that started as `(0..n).rev()` and was popped and pushed: the length of its
/// untouched bottom (`n-1, n-2, …` down to what it reached), and the rest.
fn split_fresh<T: Copy + PartialEq + TryFrom<usize>>(stack: &[T], n: usize) -> (usize, Vec<T>) {
    let untouched = stack
        .iter()
        .zip((0..n).rev())
        .take_while(|(v, i)| T::try_from(*i).is_ok_and(|i| **v == i))
        .count();
    (n - untouched, stack[untouched..].to_vec())
}

/// The session table of one shard.
#[derive(Debug)]
pub struct Sessions {
    cfg: SessionConfig,
    index: HashMap<ClientKey, u32>,
    /// Live sessions per client address.
    per_address: HashMap<[u8; 16], u16>,
    sessions: Vec<Session>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Where the search for an idle session to take over goes on from.
    hand: usize,
    bulk: Vec<[u8; BULK_PAYLOAD_MAX]>,
    bulk_free: Vec<u16>,
}

/// Sessions probed for idleness per new client when the table is full (bounded work per
/// request, whatever a flood of new clients does).
const IDLE_PROBES: usize = 8;

impl Sessions {
    /// A table sized by `cfg`.
    pub fn new(cfg: SessionConfig) -> Self {
        let n = cfg.sessions.max(1);
        let bulk = cfg.bulk_payloads.clamp(1, usize::from(NO_BULK));
        Sessions {
            cfg,
            // hashbrown never reallocates below its capacity; entries never exceed `n`.
            index: HashMap::with_capacity(n),
            per_address: HashMap::with_capacity(n),
            sessions: vec![
                Session {
                    key: ClientKey {
                        addr: [0; 16],
                        port: 0
                    },
                    last_ns: 0,
                    bulk_held: 0,
                    live: false,
                };
                n
            ],
            slots: vec![EMPTY_SLOT; n * SESSION_SLOTS],
            free: (0..n as u32).rev().collect(),
            hand: 0,
            bulk: vec![[0; BULK_PAYLOAD_MAX]; bulk],
            bulk_free: (0..bulk as u16).rev().collect(),
        }
    }

    /// The table, for a replica's snapshot (§5.19).
    pub(crate) fn state(&self) -> SessionsState {
        let (fresh_below, free) = split_fresh(&self.free, self.sessions.len());
        let (bulk_fresh_below, bulk_free) = split_fresh(&self.bulk_free, self.bulk.len());
        let in_use: Vec<u16> = self
            .slots
            .iter()
            .filter(|s| s.bulk != NO_BULK)
            .map(|s| s.bulk)
            .collect();
        SessionsState {
            index: self.index.clone(),
            per_address: self.per_address.clone(),
            sessions: self
                .sessions
                .iter()
                .enumerate()
                .filter(|(i, s)| s.live || *i < fresh_below)
                .map(|(i, s)| {
                    let slots = self.slots[i * SESSION_SLOTS..(i + 1) * SESSION_SLOTS].to_vec();
                    (i as u32, *s, slots)
                })
                .collect(),
            fresh_below: fresh_below as u32,
            free,
            hand: self.hand,
            bulk: in_use
                .into_iter()
                .map(|b| (b, self.bulk[usize::from(b)].to_vec()))
                .collect(),
            bulk_fresh_below: bulk_fresh_below as u16,
            bulk_free,
        }
    }

    /// Takes a snapshot's table; `false` if it is not one of this size.
    pub(crate) fn set_state(&mut self, s: SessionsState) -> bool {
        let (n, nb) = (self.sessions.len(), self.bulk.len());
        if s.fresh_below as usize > n || usize::from(s.bulk_fresh_below) > nb {
            return false;
        }
        for (i, sess, slots) in s.sessions {
            let i = i as usize;
            if i >= n || slots.len() != SESSION_SLOTS {
                return false;
            }
            self.sessions[i] = sess;
            self.slots[i * SESSION_SLOTS..(i + 1) * SESSION_SLOTS].copy_from_slice(&slots);
        }
        for (b, bytes) in s.bulk {
            match (self.bulk.get_mut(usize::from(b)), bytes.len()) {
                (Some(dst), BULK_PAYLOAD_MAX) => dst.copy_from_slice(&bytes),
                _ => return false,
            }
        }
        self.index = s.index;
        self.per_address = s.per_address;
        self.free = (s.fresh_below..n as u32).rev().chain(s.free).collect();
        self.hand = s.hand;
        self.bulk_free = (s.bulk_fresh_below..nb as u16)
            .rev()
            .chain(s.bulk_free)
            .collect();
        true
    }

    /// The session of `key`, made (or taken over from an idle client) if there is none.
    fn session(&mut self, key: ClientKey, now_ns: u64) -> Option<u32> {
        if let Some(&s) = self.index.get(&key) {
            return Some(s);
        }
        let cap = self.cfg.per_address.max(1);
        let held = |me: &Self| me.per_address.get(&key.addr).copied().unwrap_or(0);
        let s = if held(self) >= cap {
            // At its cap: only if one of the sessions taken over for idleness was its own.
            let s = self.take_idle(now_ns)?;
            if held(self) >= cap {
                self.free.push(s);
                return None;
            }
            s
        } else {
            match self.free.pop() {
                Some(s) => s,
                None => self.take_idle(now_ns)?,
            }
        };
        *self.per_address.entry(key.addr).or_default() += 1;
        self.sessions[s as usize] = Session {
            key,
            last_ns: now_ns,
            bulk_held: 0,
            live: true,
        };
        self.index.insert(key, s);
        Some(s)
    }

    /// Frees one session idle for longer than the idle time, probing a few from the hand on.
    fn take_idle(&mut self, now_ns: u64) -> Option<u32> {
        let idle_ns = self.cfg.idle_ms.saturating_mul(1_000_000);
        let n = self.sessions.len();
        for _ in 0..IDLE_PROBES.min(n) {
            let s = self.hand;
            self.hand = (self.hand + 1) % n;
            let sess = self.sessions[s];
            if sess.live && now_ns.saturating_sub(sess.last_ns) > idle_ns {
                self.index.remove(&sess.key);
                if let Some(n) = self.per_address.get_mut(&sess.key.addr) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_address.remove(&sess.key.addr);
                    }
                }
                for slot in &mut self.slots[s * SESSION_SLOTS..(s + 1) * SESSION_SLOTS] {
                    if slot.bulk != NO_BULK {
                        self.bulk_free.push(slot.bulk);
                    }
                    *slot = EMPTY_SLOT;
                }
                self.sessions[s].live = false;
                return Some(s as u32);
            }
        }
        None
    }

    /// Looks up request `request_id` of `key`; `bulk` says whether its reply may carry a bulk
    /// payload (room for one is reserved before it runs).
    pub fn lookup(
        &mut self,
        key: ClientKey,
        request_id: u64,
        bulk: bool,
        now_ns: u64,
    ) -> Lookup<'_> {
        let Some(s) = self.session(key, now_ns) else {
            return Lookup::Busy;
        };
        let slot = s as usize * SESSION_SLOTS + (request_id % SESSION_SLOTS as u64) as usize;
        let seq = (request_id >> SESSION_SLOT_BITS) + 1;
        let have = self.slots[slot].seq;
        if have == seq {
            self.sessions[s as usize].last_ns = now_ns;
            let sl = &self.slots[slot];
            let payload = match sl.bulk {
                NO_BULK => &[][..],
                b => &self.bulk[usize::from(b)][..usize::from(sl.bulk_len)],
            };
            return Lookup::Duplicate(sl.reply, payload);
        }
        if have > seq {
            return Lookup::Stale;
        }
        // A new request: the slot's previous one is finished with, and so is its payload.
        let sess = &mut self.sessions[s as usize];
        let old = self.slots[slot].bulk;
        if old != NO_BULK {
            self.bulk_free.push(old);
            sess.bulk_held -= 1;
            self.slots[slot].bulk = NO_BULK;
        }
        if bulk {
            if sess.bulk_held >= self.cfg.bulk_per_session {
                return Lookup::Busy;
            }
            let Some(b) = self.bulk_free.pop() else {
                return Lookup::Busy;
            };
            sess.bulk_held += 1;
            self.slots[slot].bulk = b;
        }
        sess.last_ns = now_ns;
        Lookup::New(SlotRef {
            slot: slot as u32,
            seq,
        })
    }

    /// Stores the outcome of the request [`Sessions::lookup`] found new (a bulk payload only
    /// if room was reserved for it; at most [`BULK_PAYLOAD_MAX`] bytes).
    pub fn record(&mut self, at: SlotRef, reply: StoredReply, payload: &[u8]) {
        let sl = &mut self.slots[at.slot as usize];
        sl.seq = at.seq;
        sl.reply = reply;
        sl.bulk_len = 0;
        if sl.bulk != NO_BULK {
            let n = payload.len().min(BULK_PAYLOAD_MAX);
            self.bulk[usize::from(sl.bulk)][..n].copy_from_slice(&payload[..n]);
            sl.bulk_len = n as u16;
        }
    }

    /// Sessions live now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes the table takes (for the memory report; the index counted by its capacity).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
            + self.sessions.capacity() * size_of::<Session>()
            + self.free.capacity() * 4
            + self.bulk.capacity() * BULK_PAYLOAD_MAX
            + self.bulk_free.capacity() * 2
            + self.index.capacity() * (size_of::<(ClientKey, u32)>() + 1)
            + self.per_address.capacity() * (size_of::<([u8; 16], u16)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn client(c: u8) -> ClientKey {
        ClientKey {
            addr: [c; 16],
            port: 7,
        }
    }

    fn id(slot: u64, seq: u64) -> u64 {
        seq << SESSION_SLOT_BITS | slot
    }

    fn reply(op0: u64) -> StoredReply {
        StoredReply {
            operand0: op0,
            ..StoredReply::EMPTY
        }
    }

    fn run(s: &mut Sessions, c: ClientKey, req: u64, op0: u64, now: u64) -> bool {
        match s.lookup(c, req, false, now) {
            Lookup::New(at) => {
                s.record(at, reply(op0), &[]);
                true
            }
            _ => false,
        }
    }

    #[test]
    fn new_duplicate_stale() {
        let mut s = Sessions::new(SessionConfig::DEFAULT);
        let a = client(1);
        assert!(run(&mut s, a, id(3, 10), 42, 0));
        assert_eq!(
            s.lookup(a, id(3, 10), false, MS),
            Lookup::Duplicate(reply(42), &[])
        );
        // Another client's same id is another session.
        assert!(run(&mut s, client(2), id(3, 10), 7, 0));
        // The slot moves on: the old id is stale from then on, the new one a duplicate.
        assert!(run(&mut s, a, id(3, 11), 43, 2 * MS));
        assert_eq!(s.lookup(a, id(3, 10), false, 3 * MS), Lookup::Stale);
        assert_eq!(
            s.lookup(a, id(3, 11), false, 3 * MS),
            Lookup::Duplicate(reply(43), &[])
        );
        // Other slots are independent.
        assert!(run(&mut s, a, id(4, 0), 1, 3 * MS));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn no_client_can_push_out_another() {
        // Far more requests from far more clients than the table has sessions: the first
        // client's reply stays, and the flood is refused rather than evicting it.
        let cfg = SessionConfig {
            sessions: 64,
            ..SessionConfig::DEFAULT
        };
        let mut s = Sessions::new(cfg);
        let victim = client(0);
        assert!(run(&mut s, victim, id(0, 1), 99, 0));
        let (mut ran, mut busy) = (0, 0);
        for i in 0..200_000u64 {
            let mut addr = [1; 16];
            addr[8..].copy_from_slice(&i.to_be_bytes());
            let c = ClientKey { addr, port: 7 };
            match s.lookup(c, i, false, MS) {
                Lookup::New(at) => {
                    s.record(at, reply(i), &[]);
                    ran += 1;
                }
                Lookup::Busy => busy += 1,
                _ => {}
            }
        }
        assert_eq!(ran, 63, "63 free sessions, then BUSY");
        assert!(busy > 199_000);
        assert_eq!(
            s.lookup(victim, id(0, 1), false, 2 * MS),
            Lookup::Duplicate(reply(99), &[])
        );
        // Once the flood's sessions sit idle, new clients take them over.
        let later = 2 * MS + cfg.idle_ms * MS + 1;
        assert!(run(&mut s, client(9), id(0, 0), 5, later));
    }

    #[test]
    fn one_address_cannot_take_every_session() {
        let mut s = Sessions::new(SessionConfig {
            sessions: 100,
            per_address: 8,
            ..SessionConfig::DEFAULT
        });
        let port = |p: u16| ClientKey {
            addr: [1; 16],
            port: p,
        };
        for p in 0..8 {
            assert!(run(&mut s, port(p), id(0, 0), 0, 0));
        }
        // Its ninth port is refused; another host still gets one; a known port still works.
        assert_eq!(s.lookup(port(8), id(0, 0), false, 0), Lookup::Busy);
        assert!(run(&mut s, client(2), id(0, 0), 0, 0));
        assert!(run(&mut s, port(3), id(1, 0), 0, 0));
        // Once its sessions went idle and were taken over, the address may have new ones.
        let later = SessionConfig::DEFAULT.idle_ms * MS + 1;
        let mut s2 = Sessions::new(SessionConfig {
            sessions: 8,
            per_address: 8,
            ..SessionConfig::DEFAULT
        });
        for p in 0..8 {
            assert!(run(&mut s2, port(p), id(0, 0), 0, 0));
        }
        for p in 100..108 {
            assert!(run(&mut s2, port(p), id(0, 0), 0, later), "port {p}");
        }
    }

    #[test]
    fn bulk_payloads_are_bounded_per_session() {
        let cfg = SessionConfig {
            bulk_payloads: 3,
            bulk_per_session: 2,
            ..SessionConfig::DEFAULT
        };
        let mut s = Sessions::new(cfg);
        let (a, b) = (client(1), client(2));
        for slot in 0..2 {
            let Lookup::New(at) = s.lookup(a, id(slot, 0), true, 0) else {
                panic!("room for two");
            };
            s.record(at, reply(slot), &[slot as u8; 3]);
        }
        assert_eq!(s.lookup(a, id(2, 0), true, 0), Lookup::Busy);
        assert_eq!(
            s.lookup(a, id(1, 0), true, 0),
            Lookup::Duplicate(reply(1), &[1, 1, 1])
        );
        // The third payload is b's; a's next bulk request in slot 0 frees slot 0's first.
        assert!(matches!(s.lookup(b, id(0, 0), true, 0), Lookup::New(_)));
        assert_eq!(s.lookup(b, id(1, 0), true, 0), Lookup::Busy);
        let Lookup::New(at) = s.lookup(a, id(0, 1), true, 0) else {
            panic!("slot 0's old payload is reused");
        };
        s.record(at, reply(5), &[5]);
        assert_eq!(
            s.lookup(a, id(0, 1), true, 0),
            Lookup::Duplicate(reply(5), &[5])
        );
    }
}
