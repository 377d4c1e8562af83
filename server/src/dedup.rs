//! At-most-once execution: a bounded table of recent replies to non-idempotent requests, keyed
//! by (client address, client port, request id). A retransmission finds its entry and gets the
//! original reply instead of a second execution.
//!
//! Two FIFO rings sized at start-up: small replies (status, lease, operand, first handle) for
//! every request, and a smaller ring of payloads for bulk replies (handle lists, per-item
//! statuses). The index is a hash map with room for both rings, so the hot path never
//! allocates. The table remembers the last `capacity` non-idempotent requests of all clients:
//! that is its horizon, which must exceed a client's retry budget at the server's request rate.

use std::collections::HashMap;

use bluebridge_proto::{PageHandle, Status};

use crate::lease::ClientKey;

/// Key of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupKey {
    /// The client.
    pub client: ClientKey,
    /// Its request id.
    pub request_id: u64,
}

/// The most bytes a stored bulk payload holds (128 handles).
pub const BULK_PAYLOAD_MAX: usize = 128 * 8;

/// A stored reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Whether a bulk payload was stored with it.
    pub has_payload: bool,
}

#[derive(Debug)]
struct Ring<V> {
    slots: Vec<Option<(DedupKey, V)>>,
    next: usize,
}

impl<V> Ring<V> {
    fn new(cap: usize) -> Self {
        Ring {
            slots: (0..cap).map(|_| None).collect(),
            next: 0,
        }
    }

    /// Stores `v` in the next slot; returns the key it evicted.
    fn push(&mut self, k: DedupKey, v: V) -> (usize, Option<DedupKey>) {
        let at = self.next;
        self.next = (self.next + 1) % self.slots.len();
        let old = self.slots[at].replace((k, v)).map(|(k, _)| k);
        (at, old)
    }
}

/// Where an entry's parts live.
#[derive(Debug, Clone, Copy)]
struct Slots {
    small: u32,
    bulk: Option<u32>,
}

/// The duplicate-suppression table.
#[derive(Debug)]
pub struct Dedup {
    small: Ring<StoredReply>,
    bulk: Ring<([u8; BULK_PAYLOAD_MAX], u16)>,
    index: HashMap<DedupKey, Slots>,
}

impl Dedup {
    /// A table remembering `capacity` replies, `bulk_capacity` of them with payloads.
    pub fn new(capacity: usize, bulk_capacity: usize) -> Self {
        Dedup {
            small: Ring::new(capacity.max(1)),
            bulk: Ring::new(bulk_capacity.max(1)),
            // hashbrown never reallocates below its capacity; entries never exceed the rings.
            index: HashMap::with_capacity(capacity.max(1) + bulk_capacity.max(1)),
        }
    }

    /// The stored reply of a request, and its bulk payload if it has one.
    pub fn get(&self, k: &DedupKey) -> Option<(StoredReply, &[u8])> {
        let s = self.index.get(k)?;
        let (_, r) = self.small.slots[s.small as usize].as_ref()?;
        let payload = match s.bulk {
            Some(b) => {
                let (_, (buf, len)) = self.bulk.slots[b as usize].as_ref()?;
                &buf[..usize::from(*len)]
            }
            None => &[][..],
        };
        Some((*r, payload))
    }

    /// Remembers the reply to a request (with a payload for bulk replies, at most
    /// [`BULK_PAYLOAD_MAX`] bytes), evicting the oldest entries.
    pub fn insert(&mut self, k: DedupKey, mut r: StoredReply, payload: &[u8]) {
        r.has_payload = !payload.is_empty();
        let (small, evicted) = self.small.push(k, r);
        if let Some(old) = evicted {
            self.forget(&old);
        }
        let bulk = (!payload.is_empty()).then(|| {
            let mut buf = [0u8; BULK_PAYLOAD_MAX];
            let n = payload.len().min(BULK_PAYLOAD_MAX);
            buf[..n].copy_from_slice(&payload[..n]);
            let (at, evicted) = self.bulk.push(k, (buf, n as u16));
            if let Some(old) = evicted {
                // The payload of an older entry is gone: forget that entry whole rather than
                // replay it without its payload.
                self.forget(&old);
            }
            at as u32
        });
        self.index.insert(
            k,
            Slots {
                small: small as u32,
                bulk,
            },
        );
    }

    /// Drops an entry from the index and clears whichever of its slots still hold it (a slot
    /// just overwritten by `push` holds the new entry and is left alone).
    fn forget(&mut self, k: &DedupKey) {
        let Some(s) = self.index.remove(k) else {
            return;
        };
        let small = &mut self.small.slots[s.small as usize];
        if small.as_ref().is_some_and(|(key, _)| key == k) {
            *small = None;
        }
        if let Some(b) = s.bulk {
            let bulk = &mut self.bulk.slots[b as usize];
            if bulk.as_ref().is_some_and(|(key, _)| key == k) {
                *bulk = None;
            }
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes the table takes (for the memory report; the index counted by its capacity).
    pub fn bytes(&self) -> usize {
        self.small.slots.capacity() * size_of::<Option<(DedupKey, StoredReply)>>()
            + self.bulk.slots.capacity()
                * size_of::<Option<(DedupKey, ([u8; BULK_PAYLOAD_MAX], u16))>>()
            + self.index.capacity() * (size_of::<(DedupKey, Slots)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: u8, id: u64) -> DedupKey {
        DedupKey {
            client: ClientKey {
                addr: [c; 16],
                port: 7,
            },
            request_id: id,
        }
    }

    fn reply(op0: u64) -> StoredReply {
        StoredReply {
            status: Status::OK,
            handle: PageHandle::from_bits(1),
            lease: 0,
            operand0: op0,
            count: 1,
            has_payload: false,
        }
    }

    #[test]
    fn remembers_and_evicts_oldest() {
        let mut d = Dedup::new(3, 1);
        for i in 0..3 {
            d.insert(key(1, i), reply(i), &[]);
        }
        assert_eq!(d.get(&key(1, 0)).unwrap().0.operand0, 0);
        assert!(
            d.get(&key(2, 0)).is_none(),
            "another client's id is another key"
        );
        d.insert(key(1, 3), reply(3), &[]);
        assert!(d.get(&key(1, 0)).is_none());
        assert_eq!(d.get(&key(1, 3)).unwrap().0.operand0, 3);
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn bulk_payloads() {
        let mut d = Dedup::new(8, 1);
        d.insert(key(1, 1), reply(0), &[1, 2, 3]);
        let (r, p) = d.get(&key(1, 1)).unwrap();
        assert!(r.has_payload);
        assert_eq!(p, &[1, 2, 3]);
        // A second bulk entry evicts the first one's payload, and with it the whole entry.
        d.insert(key(1, 2), reply(0), &[4]);
        assert!(d.get(&key(1, 1)).is_none());
        assert_eq!(d.get(&key(1, 2)).unwrap().1, &[4]);
    }
}
