//! UPDATE leases: a fixed table of exclusive, expiring locks on pages.
//!
//! A lease id carries its expiry (milliseconds since the server started, upper 40 bits) above a
//! sequence number (lower 24 bits), so a late commit whose lease has already been cleared and
//! reused is still recognised as expired rather than merely invalid.

use bluebridge_proto::Status;

use crate::store::{PageIdx, Store};

/// Who holds a lease: the client's address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Client IPv6 address.
    pub addr: [u8; 16],
    /// Client UDP port.
    pub port: u16,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: u64,
    holder: ClientKey,
    acquire_request: u64,
    expires_ns: u64,
}

/// What an acquire found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The lease id.
    pub id: u64,
    /// Milliseconds it is valid for, from now.
    pub ms: u64,
}

/// The lease table.
#[derive(Debug)]
pub struct Leases {
    slots: Vec<Option<Lease>>,
    free: Vec<u16>,
    seq: u32,
    default_ms: u64,
    max_ms: u64,
}

const SEQ_BITS: u32 = 24;

impl Leases {
    /// A table of `capacity` (≤ 65535) leases; leases last `default_ms` unless asked otherwise,
    /// and at most `max_ms`.
    pub fn new(capacity: u16, default_ms: u64, max_ms: u64) -> Self {
        Leases {
            slots: vec![None; usize::from(capacity)],
            free: (0..capacity).rev().collect(),
            seq: 0,
            default_ms,
            max_ms,
        }
    }

    fn live(&self, store: &Store, p: PageIdx, now_ns: u64) -> Option<(u16, Lease)> {
        let slot = store.lease_slot(p).checked_sub(1)?;
        let l = self.slots[usize::from(slot)]?;
        (l.expires_ns > now_ns).then_some((slot, l))
    }

    fn clear(&mut self, store: &mut Store, p: PageIdx) {
        if let Some(slot) = store.lease_slot(p).checked_sub(1) {
            self.slots[usize::from(slot)] = None;
            self.free.push(slot);
            store.set_lease_slot(p, 0);
        }
    }

    /// Whether `who` may modify the page: no live lease, or theirs.
    pub fn check_writer(
        &self,
        store: &Store,
        p: PageIdx,
        who: ClientKey,
        now_ns: u64,
    ) -> Result<(), Status> {
        match self.live(store, p, now_ns) {
            Some((_, l)) if l.holder != who => Err(Status::LEASE_HELD),
            _ => Ok(()),
        }
    }

    /// Grants the page's lease to `who`, or returns the one it already holds for this same
    /// request (a retransmitted ACQUIRE).
    pub fn acquire(
        &mut self,
        store: &mut Store,
        p: PageIdx,
        who: ClientKey,
        request: u64,
        ms: u64,
        now_ns: u64,
    ) -> Result<Granted, Status> {
        if let Some((_, l)) = self.live(store, p, now_ns) {
            if l.holder == who && l.acquire_request == request {
                return Ok(Granted {
                    id: l.id,
                    ms: (l.expires_ns - now_ns).div_ceil(1_000_000),
                });
            }
            return Err(Status::LEASE_HELD);
        }
        self.clear(store, p); // an expired lease
        let Some(slot) = self.free.pop() else {
            return Err(Status::BUSY);
        };
        let ms = if ms == 0 {
            self.default_ms
        } else {
            ms.min(self.max_ms)
        };
        let expires_ns = now_ns + ms * 1_000_000;
        self.seq = (self.seq + 1) & ((1 << SEQ_BITS) - 1);
        let id = (expires_ns / 1_000_000 + 1) << SEQ_BITS | u64::from(self.seq);
        self.slots[usize::from(slot)] = Some(Lease {
            id,
            holder: who,
            acquire_request: request,
            expires_ns,
        });
        store.set_lease_slot(p, slot + 1);
        Ok(Granted { id, ms })
    }

    /// Checks that `id` is the page's live lease (for COMMIT and RELEASE).
    pub fn check(&self, store: &Store, p: PageIdx, id: u64, now_ns: u64) -> Result<(), Status> {
        if let Some((_, l)) = self.live(store, p, now_ns)
            && l.id == id
        {
            return Ok(());
        }
        // Not the live lease: expired if the id's own expiry has passed, else never valid here.
        let expiry_ms = (id >> SEQ_BITS).saturating_sub(1);
        if expiry_ms * 1_000_000 <= now_ns && id >> SEQ_BITS != 0 {
            Err(Status::LEASE_EXPIRED)
        } else {
            Err(Status::LEASE_INVALID)
        }
    }

    /// Ends the page's lease (commit, release, or the page being freed).
    pub fn release(&mut self, store: &mut Store, p: PageIdx) {
        self.clear(store, p);
    }

    /// Leases granted and not yet ended (expired ones count until they are reclaimed).
    pub fn in_use(&self) -> u64 {
        (self.slots.len() - self.free.len()) as u64
    }

    /// Live leases.
    pub fn held(&self, now_ns: u64) -> u64 {
        self.slots
            .iter()
            .flatten()
            .filter(|l| l.expires_ns > now_ns)
            .count() as u64
    }

    /// Bytes the table takes (for the memory report).
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Option<Lease>>() + self.free.capacity() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientKey = ClientKey {
        addr: [1; 16],
        port: 1,
    };
    const B: ClientKey = ClientKey {
        addr: [2; 16],
        port: 1,
    };
    const MS: u64 = 1_000_000;

    #[test]
    fn acquire_commit_expire() {
        let mut s = Store::new(2 << 20, false).unwrap();
        let (p, _) = s.alloc(1, true).unwrap();
        let mut l = Leases::new(4, 100, 1000);
        let now = 5 * MS;
        let g = l.acquire(&mut s, p, A, 1, 0, now).unwrap();
        assert_eq!(g.ms, 100);
        // A retransmitted acquire gets the same lease; anyone else is refused.
        assert_eq!(l.acquire(&mut s, p, A, 1, 0, now + MS).unwrap().id, g.id);
        assert_eq!(l.acquire(&mut s, p, A, 2, 0, now), Err(Status::LEASE_HELD));
        assert_eq!(l.acquire(&mut s, p, B, 1, 0, now), Err(Status::LEASE_HELD));
        assert_eq!(l.check_writer(&s, p, B, now), Err(Status::LEASE_HELD));
        assert_eq!(l.check_writer(&s, p, A, now), Ok(()));
        assert_eq!(l.check(&s, p, g.id, now), Ok(()));
        assert_eq!(l.check(&s, p, g.id + 1, now), Err(Status::LEASE_INVALID));
        assert_eq!(l.held(now), 1);
        // After expiry: the holder's late commit is rejected as expired, others may acquire.
        let late = now + 101 * MS;
        assert_eq!(l.check(&s, p, g.id, late), Err(Status::LEASE_EXPIRED));
        assert_eq!(l.check_writer(&s, p, B, late), Ok(()));
        let g2 = l.acquire(&mut s, p, B, 9, 5000, late).unwrap();
        assert_eq!(g2.ms, 1000);
        assert_eq!(l.check(&s, p, g.id, late), Err(Status::LEASE_EXPIRED));
        l.release(&mut s, p);
        assert_eq!(l.held(late), 0);
        assert_eq!(l.check(&s, p, g2.id, late), Err(Status::LEASE_INVALID));
    }

    #[test]
    fn table_full_is_busy() {
        let mut s = Store::new(2 << 20, false).unwrap();
        let mut l = Leases::new(1, 100, 1000);
        let (p, _) = s.alloc(1, true).unwrap();
        let (q, _) = s.alloc(1, true).unwrap();
        l.acquire(&mut s, p, A, 1, 0, 0).unwrap();
        assert_eq!(l.acquire(&mut s, q, A, 2, 0, 0), Err(Status::BUSY));
        l.release(&mut s, p);
        l.acquire(&mut s, q, A, 2, 0, 0).unwrap();
    }
}
