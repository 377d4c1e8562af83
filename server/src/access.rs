//! Who may use this server and its pages.
//!
//! - A server may be restricted to client prefixes: requests from elsewhere get FORBIDDEN.
//! - A page belongs to the client address that allocated it; other clients get FORBIDDEN until
//!   the page is shared (SHARED at allocation, or a later SHARE by the owner). Ownership goes
//!   by address, not port: a restarted client keeps its pages.
//!
//! Owner ids are handed out from a table sized at start-up, so page metadata holds a 32-bit id
//! rather than a 16-byte address. An owner is an address with at least one page: the table
//! counts each owner's pages and forgets an owner (its id goes back to the free list) when its
//! last page is freed, so a flood of allocations from made-up addresses fills it only while
//! those pages live, and a failed allocation registers nobody.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use bluebridge_proto::Status;

use crate::store::{PageIdx, Store};

/// An IPv6 network: address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientPrefix {
    /// Network address.
    pub network: Ipv6Addr,
    /// Prefix length (0..=128).
    pub len: u8,
}

impl ClientPrefix {
    /// Whether `a` is inside.
    pub fn contains(&self, a: Ipv6Addr) -> bool {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.len.min(128)))
            .unwrap_or(0);
        u128::from(a) & mask == u128::from(self.network) & mask
    }
}

impl std::str::FromStr for ClientPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not ADDRESS/LENGTH"))?;
        let network = net
            .parse()
            .map_err(|_| format!("`{net}` is not an IPv6 address"))?;
        let len = len
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("`{len}` is not a prefix length (0-128)"))?;
        Ok(ClientPrefix { network, len })
    }
}

/// One owner: its address, how many pages it holds, and whether it fell silent.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Owner {
    addr: [u8; 16],
    pages: u64,
    orphan: bool,
}

/// The owner table as a replica's snapshot carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct AccessState {
    owners: HashMap<[u8; 16], u32>,
    by_id: Vec<Option<Owner>>,
    free_ids: Vec<u32>,
    orphans: usize,
}

/// The access rules and the owner table.
#[derive(Debug)]
pub struct Access {
    allowed: Vec<ClientPrefix>,
    owners: HashMap<[u8; 16], u32>,
    /// By id − 1.
    by_id: Vec<Option<Owner>>,
    free_ids: Vec<u32>,
    capacity: usize,
    /// Owners marked orphan now.
    orphans: usize,
}

impl Access {
    /// Rules allowing `allowed` client prefixes (empty: anyone), with room for `capacity`
    /// distinct page owners.
    pub fn new(allowed: Vec<ClientPrefix>, capacity: usize) -> Self {
        Access {
            allowed,
            owners: HashMap::with_capacity(capacity),
            by_id: Vec::with_capacity(capacity),
            free_ids: Vec::new(),
            capacity,
            orphans: 0,
        }
    }

    /// Whether `client` may use this server at all.
    pub fn client_allowed(&self, client: Ipv6Addr) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|p| p.contains(client))
    }

    /// The owner id of `client`, made on first use; BUSY when the table is full. A new
    /// owner holds no page: the caller reports the pages it allocated with
    /// [`Access::pages_added`] (0 if the allocation failed, which forgets the owner again).
    pub fn owner_id(&mut self, client: [u8; 16]) -> Result<u32, Status> {
        if let Some(&id) = self.owners.get(&client) {
            return Ok(id);
        }
        if self.owners.len() >= self.capacity {
            return Err(Status::BUSY);
        }
        let owner = Some(Owner {
            addr: client,
            pages: 0,
            orphan: false,
        });
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.by_id[id as usize - 1] = owner;
                id
            }
            None => {
                self.by_id.push(owner);
                self.by_id.len() as u32
            }
        };
        self.owners.insert(client, id);
        Ok(id)
    }

    /// Owner `id` now holds `n` more pages; an owner left with none is forgotten.
    pub fn pages_added(&mut self, id: u32, n: u64) {
        if let Some(Some(o)) = self.by_id.get_mut((id as usize).wrapping_sub(1)) {
            o.pages += n;
        }
        self.forget_if_idle(id);
    }

    /// One page of owner `id` was freed.
    pub fn page_freed(&mut self, id: u32) {
        if let Some(Some(o)) = self.by_id.get_mut((id as usize).wrapping_sub(1)) {
            o.pages = o.pages.saturating_sub(1);
        }
        self.forget_if_idle(id);
    }

    fn forget_if_idle(&mut self, id: u32) {
        let i = (id as usize).wrapping_sub(1);
        if let Some(Some(o)) = self.by_id.get(i)
            && o.pages == 0
        {
            self.orphans -= usize::from(o.orphan);
            self.owners.remove(&o.addr);
            self.by_id[i] = None;
            self.free_ids.push(id);
        }
    }

    /// The owner table, for a replica's snapshot (§5.19).
    pub(crate) fn state(&self) -> AccessState {
        AccessState {
            owners: self.owners.clone(),
            by_id: self.by_id.clone(),
            free_ids: self.free_ids.clone(),
            orphans: self.orphans,
        }
    }

    /// Takes a snapshot's owner table.
    pub(crate) fn set_state(&mut self, s: AccessState) {
        self.owners = s.owners;
        self.by_id = s.by_id;
        self.free_ids = s.free_ids;
        self.orphans = s.orphans;
    }

    /// Owners with pages now.
    pub fn owners(&self) -> usize {
        self.owners.len()
    }

    /// One past the highest owner id in use (ids run from 1).
    pub fn id_limit(&self) -> u32 {
        self.by_id.len() as u32 + 1
    }

    /// The owner id of `client`, if it holds pages.
    pub fn id_of(&self, client: &[u8; 16]) -> Option<u32> {
        self.owners.get(client).copied()
    }

    /// Owner `id`'s entry, if the id is in use.
    fn entry(&self, id: u32) -> Option<&Owner> {
        self.by_id.get((id as usize).wrapping_sub(1))?.as_ref()
    }

    /// Owner `id`'s address and page count, if the id is in use.
    pub fn owner(&self, id: u32) -> Option<([u8; 16], u64)> {
        self.entry(id).map(|o| (o.addr, o.pages))
    }

    /// Marks owner `id` orphan (silent past the grace period) or not; true if it was not
    /// marked orphan before and is now.
    pub fn set_orphan(&mut self, id: u32, orphan: bool) -> bool {
        let Some(Some(o)) = self.by_id.get_mut((id as usize).wrapping_sub(1)) else {
            return false;
        };
        let newly = orphan && !o.orphan;
        if o.orphan != orphan {
            o.orphan = orphan;
            if orphan {
                self.orphans += 1;
            } else {
                self.orphans -= 1;
            }
        }
        newly
    }

    /// Whether owner `id` is marked orphan.
    pub fn is_orphan(&self, id: u32) -> bool {
        self.entry(id).is_some_and(|o| o.orphan)
    }

    /// Owners marked orphan now.
    pub fn orphans(&self) -> usize {
        self.orphans
    }

    /// The address behind owner id `id`.
    pub fn owner_addr(&self, id: u32) -> Option<[u8; 16]> {
        self.entry(id).map(|o| o.addr)
    }

    /// Whether `client` may use page `p`: shared, or its own.
    pub fn check(&self, store: &Store, p: PageIdx, client: [u8; 16]) -> Result<(), Status> {
        if store.is_shared(p) || self.owners.get(&client) == Some(&store.owner(p)) {
            Ok(())
        } else {
            Err(Status::FORBIDDEN)
        }
    }

    /// Bytes the owner table takes (for the memory report).
    pub fn bytes(&self) -> usize {
        self.owners.capacity() * (16 + 4 + 1)
            + self.by_id.capacity() * size_of::<Option<Owner>>()
            + self.free_ids.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p: ClientPrefix = "fd00:bb:1::/48".parse().unwrap();
        assert!(p.contains("fd00:bb:1::1".parse().unwrap()));
        assert!(p.contains("fd00:bb:1:ffff::1".parse().unwrap()));
        assert!(!p.contains("fd00:bb:2::1".parse().unwrap()));
        let all: ClientPrefix = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        let one: ClientPrefix = "fd00:bb:1::1/128".parse().unwrap();
        assert!(
            one.contains("fd00:bb:1::1".parse().unwrap())
                && !one.contains("fd00:bb:1::2".parse().unwrap())
        );
        assert!("fd00::/129".parse::<ClientPrefix>().is_err());
        assert!("fd00::".parse::<ClientPrefix>().is_err());
        assert!("nope/12".parse::<ClientPrefix>().is_err());
    }

    #[test]
    fn owner_table_is_bounded() {
        let mut a = Access::new(vec![], 2);
        assert_eq!(a.owner_id([1; 16]), Ok(1));
        a.pages_added(1, 2);
        assert_eq!(a.owner_id([2; 16]), Ok(2));
        a.pages_added(2, 1);
        assert_eq!(a.owner_id([1; 16]), Ok(1));
        assert_eq!(a.owner_id([3; 16]), Err(Status::BUSY));
        // An owner whose pages are all freed is forgotten; its id serves the next one.
        a.page_freed(2);
        assert_eq!(a.owner_addr(2), None);
        assert_eq!(a.owner_id([3; 16]), Ok(2));
        assert_eq!(a.owner_addr(2), Some([3; 16]));
        // A failed allocation (no pages added) leaves no owner behind.
        a.pages_added(2, 0);
        assert_eq!((a.owners(), a.owner_addr(2)), (1, None));
        a.page_freed(1);
        assert_eq!(a.owners(), 1);
        a.page_freed(1);
        assert_eq!(a.owners(), 0);
    }

    #[test]
    fn orphans_are_counted_until_forgotten() {
        let mut a = Access::new(vec![], 4);
        let id = a.owner_id([1; 16]).unwrap();
        a.pages_added(id, 2);
        assert!(a.set_orphan(id, true));
        assert!(!a.set_orphan(id, true), "already marked");
        assert!(a.is_orphan(id) && a.orphans() == 1);
        assert!(!a.set_orphan(id, false));
        assert_eq!(a.orphans(), 0);
        assert!(a.set_orphan(id, true));
        a.page_freed(id);
        a.page_freed(id);
        assert_eq!((a.orphans(), a.owner(id)), (0, None));
        assert!(!a.set_orphan(id, true), "no such owner");
    }
}
