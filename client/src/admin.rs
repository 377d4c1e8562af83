//! The controller's requests about page owners (docs/protocol.md §5.17): OWNERS lists who
//! holds pages on a server, RECLAIM frees one owner's pages. A server answers them only from
//! the controller's /48; from anywhere else they fail with FORBIDDEN.

use std::net::Ipv6Addr;

use bluebridge_proto::message::OwnerEntry;
use bluebridge_proto::{HostId, Opcode, PageHandle};

use crate::client::Client;
use crate::engine::Request;
use crate::error::ClientError;
use crate::transport::Transport;

/// One owner of pages on one shard of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The shard.
    pub shard: usize,
    /// The owner's address.
    pub addr: Ipv6Addr,
    /// Pages it holds on that shard.
    pub pages: u32,
    /// Milliseconds since the server last heard from it.
    pub silent_ms: u32,
}

/// Most OWNERS replies read from one shard (a bound, should a server keep answering).
const MAX_OWNER_FRAMES: usize = 1 << 16;

impl<T: Transport> Client<T> {
    /// Shards of `host` (from its STAT record; 1 from a server that does not say).
    fn shards_of(&mut self, host: HostId) -> Result<usize, ClientError> {
        Ok(usize::try_from(self.stat(host)?.shards)
            .unwrap_or(1)
            .clamp(1, bluebridge_proto::addr::MAX_SHARDS))
    }

    /// Every owner of pages on `host`, shard by shard (controller only).
    pub fn owners(&mut self, host: HostId) -> Result<Vec<Owner>, ClientError> {
        let mut out = Vec::new();
        for shard in 0..self.shards_of(host)? {
            let mut cursor = 0u64;
            for _ in 0..MAX_OWNER_FRAMES {
                let mut r = Request::new(Opcode::OWNERS, self.host_addr(host, Opcode::OWNERS));
                r.lease = PageHandle::with_shard(shard as u8, 0).to_bits();
                r.operand0 = cursor;
                let reply = self.call(r)?;
                let entries = OwnerEntry::parse_list(&reply.data).ok_or(ClientError::BadReply(
                    "an OWNERS payload of partial entries",
                ))?;
                out.extend(entries.map(|e| Owner {
                    shard,
                    addr: e.addr.into(),
                    pages: e.pages,
                    silent_ms: e.silent_ms,
                }));
                if reply.header.operand0 <= cursor {
                    break; // 0: the end (a cursor that does not advance ends it too)
                }
                cursor = reply.header.operand0;
            }
        }
        Ok(out)
    }

    /// Frees every page `owner` holds on `host`, shared and detached ones included
    /// (controller only); returns how many were freed.
    pub fn reclaim(&mut self, host: HostId, owner: Ipv6Addr) -> Result<u64, ClientError> {
        let o = u128::from(owner);
        let mut freed = 0;
        for shard in 0..self.shards_of(host)? {
            let mut r = Request::new(Opcode::RECLAIM, self.host_addr(host, Opcode::RECLAIM));
            r.lease = PageHandle::with_shard(shard as u8, 0).to_bits();
            r.operand0 = (o >> 64) as u64;
            r.operand1 = o as u64;
            freed += self.call(r)?.header.operand0;
        }
        Ok(freed)
    }
}
