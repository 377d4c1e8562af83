//! Who may use this server and its pages.
//!
//! - A server may be restricted to client prefixes: requests from elsewhere get FORBIDDEN.
//! - A page belongs to the client address that allocated it; other clients get FORBIDDEN until
//!   the page is shared (SHARED at allocation, or a later SHARE by the owner). Ownership goes
//!   by address, not port: a restarted client keeps its pages.
//!
//! Owner ids are handed out from a table sized at start-up, so page metadata holds a 32-bit id
//! rather than a 16-byte address.

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

/// The access rules and the owner table.
#[derive(Debug)]
pub struct Access {
    allowed: Vec<ClientPrefix>,
    owners: HashMap<[u8; 16], u32>,
    capacity: usize,
}

impl Access {
    /// Rules allowing `allowed` client prefixes (empty: anyone), with room for `capacity`
    /// distinct page owners.
    pub fn new(allowed: Vec<ClientPrefix>, capacity: usize) -> Self {
        Access {
            allowed,
            owners: HashMap::with_capacity(capacity),
            capacity,
        }
    }

    /// Whether `client` may use this server at all.
    pub fn client_allowed(&self, client: Ipv6Addr) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|p| p.contains(client))
    }

    /// The owner id of `client`, made on first use; BUSY when the table is full.
    pub fn owner_id(&mut self, client: [u8; 16]) -> Result<u32, Status> {
        if let Some(&id) = self.owners.get(&client) {
            return Ok(id);
        }
        if self.owners.len() >= self.capacity {
            return Err(Status::BUSY);
        }
        let id = self.owners.len() as u32 + 1;
        self.owners.insert(client, id);
        Ok(id)
    }

    /// The address behind owner id `id` (a scan: for the rare migration, not the data path).
    pub fn owner_addr(&self, id: u32) -> Option<[u8; 16]> {
        self.owners.iter().find(|&(_, &v)| v == id).map(|(a, _)| *a)
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
        assert_eq!(a.owner_id([2; 16]), Ok(2));
        assert_eq!(a.owner_id([1; 16]), Ok(1));
        assert_eq!(a.owner_id([3; 16]), Err(Status::BUSY));
    }
}
