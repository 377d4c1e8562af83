//! Coherent copies (docs/protocol.md §5.18) through the blocking API: one attempt per call.
//! A coherent region's fault handler builds the waiting (RECALLING), the lease bookkeeping and
//! the answers to REVOKE notices on these.

use std::time::{Duration, Instant};

use bluebridge_proto::message::{KEEP_NONE, KEEP_READ, KEEP_WRITE};
use bluebridge_proto::segment::Segments;
use bluebridge_proto::{Opcode, PAGE_SIZE, RemoteAddr};

use crate::Client;
use crate::engine::{Request, Revoke};
use crate::error::ClientError;
use crate::transport::Transport;

/// How long a PUT is asked again while the home answers BUSY.
pub const PUT_BUSY_WAIT: Duration = Duration::from_secs(1);

/// What the holder of a copy keeps after a PUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: the copy is given up.
    Nothing,
    /// A read copy (a writer downgrading).
    Read,
    /// The write copy (a write-back that is not a release).
    Write,
}

impl Keep {
    fn wire(self) -> u64 {
        match self {
            Keep::Nothing => KEEP_NONE,
            Keep::Read => KEEP_READ,
            Keep::Write => KEEP_WRITE,
        }
    }

    /// What a REVOKE notice's operand says the holder may keep.
    pub fn from_notice(r: &Revoke) -> Keep {
        if r.keep == KEEP_READ {
            Keep::Read
        } else {
            Keep::Nothing
        }
    }
}

/// A copy granted by a page's home.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The copy's generation (named in PUTs and REVOKE notices).
    pub generation: u64,
    /// The copy lease granted; it runs from `asked` (the client cannot know when the home
    /// received the request, only that it was not earlier).
    pub lease: Duration,
    /// When the request was first sent.
    pub asked: Instant,
    /// The page bytes, or `None` for an upgrade of a current read copy (keep its bytes).
    pub data: Option<Vec<u8>>,
    /// The home shard that granted it, whose copy lease it is under: host id << 8 | shard
    /// field (operand1 of the reply).
    pub home: u32,
}

impl<T: Transport> Client<T> {
    fn grant(&mut self, op: Opcode, page: RemoteAddr, held: u64) -> Result<Grant, ClientError> {
        let asked = Instant::now();
        let mut req = Request::new(op, page).range(0, PAGE_SIZE as u16);
        req.lease = held;
        let r = self.call(req)?;
        let data = (r.header.length != 0 || op == Opcode::GET_SHARED).then_some(r.data);
        if data.as_ref().is_some_and(|d| d.len() != PAGE_SIZE) {
            return Err(ClientError::BadReply("a copy that is not a whole page"));
        }
        Ok(Grant {
            generation: r.header.lease,
            lease: Duration::from_millis(r.header.operand0),
            asked,
            data,
            home: r.header.operand1 as u32,
        })
    }

    /// GET_SHARED: a read copy of the whole page (one attempt; [`ClientError::Recalling`]
    /// while the home recalls its writer: ask again).
    pub fn get_shared(&mut self, page: RemoteAddr) -> Result<Grant, ClientError> {
        self.grant(Opcode::GET_SHARED, page, 0)
    }

    /// GET_EXCLUSIVE: the write copy, holding the read copy of generation `held` (0: none).
    /// One attempt; [`ClientError::Recalling`] while the home revokes other copies.
    pub fn get_exclusive(&mut self, page: RemoteAddr, held: u64) -> Result<Grant, ClientError> {
        self.grant(Opcode::GET_EXCLUSIVE, page, held)
    }

    /// PUT: gives the copy of generation `generation` up, or keeps `keep` of it, writing back
    /// `data` (a whole page, from the writer). A page larger than one request frame goes as
    /// several PUTs that keep the write copy and a last one that keeps `keep`. Returns the
    /// generation of the copy kept (a new one when a writer downgrades).
    pub fn put_copy(
        &mut self,
        page: RemoteAddr,
        generation: u64,
        keep: Keep,
        data: Option<&[u8; PAGE_SIZE]>,
    ) -> Result<u64, ClientError> {
        let put = |offset: u16, bytes: &[u8], keep: Keep| {
            let mut r = Request::new(Opcode::PUT, page)
                .range(offset, bytes.len() as u16)
                .payload(bytes.to_vec());
            r.lease = generation;
            r.operand0 = keep.wire();
            r
        };
        let Some(data) = data else {
            return Ok(self.put_call(put(0, &[], keep))?.header.lease);
        };
        let segs: Vec<(u16, u16)> =
            Segments::new(0, PAGE_SIZE as u16, self.max_request_data()).collect();
        let last = segs.len() - 1;
        let mut kept = generation;
        for (i, (o, l)) in segs.into_iter().enumerate() {
            let k = if i == last { keep } else { Keep::Write };
            let bytes = &data[usize::from(o)..usize::from(o) + usize::from(l)];
            kept = self.put_call(put(o, bytes, k))?.header.lease;
        }
        Ok(kept)
    }

    /// One PUT, asked again while the home answers BUSY (its session table full for now: a
    /// copy must not be given up for that), for at most [`PUT_BUSY_WAIT`].
    fn put_call(&mut self, r: Request) -> Result<crate::Reply, ClientError> {
        let start = Instant::now();
        loop {
            match self.call(r.clone()) {
                Err(ClientError::Busy) if start.elapsed() < PUT_BUSY_WAIT => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                other => return other,
            }
        }
    }

    /// RENEW: the copy lease at `page`'s home shard goes on; returns the lease granted and
    /// the shard that renewed it (host id << 8 | shard field).
    /// [`ClientError::LeaseExpired`]: this client's copies there are void.
    pub fn renew_copies(&mut self, page: RemoteAddr) -> Result<(Duration, u32), ClientError> {
        let r = self.call(Request::new(Opcode::RENEW, page))?;
        Ok((
            Duration::from_millis(r.header.operand0),
            r.header.operand1 as u32,
        ))
    }

    /// The oldest REVOKE notice not yet taken. Notices arrive with the client's other traffic
    /// (any blocking call or [`Client::progress`] takes them in).
    pub fn take_revoke(&mut self) -> Option<Revoke> {
        self.engine_mut().take_revoke()
    }
}
