//! Coherent regions ([`Coherence::Shared`]): several processes, on several hosts, map the same
//! remote pages and see each other's writes (docs/protocol.md §5.18, docs/paging.md
//! "Sharing").
//!
//! Every resident page is a copy the page's home granted: a read copy is installed
//! write-protected, the write copy writable. A read fault asks for a read copy (GET_SHARED), a
//! write fault or the first write to a read copy for the write copy (GET_EXCLUSIVE; an upgrade
//! of a current read copy moves no bytes). While the home recalls other copies it answers
//! RECALLING and the handler asks again, answering notices meanwhile, so two regions waiting
//! for each other's pages cannot deadlock.
//!
//! A REVOKE notice takes a copy away: a read copy is dropped (`MADV_DONTNEED`) before the
//! handler answers, so no read of it can follow the answer; the write copy is write-protected
//! first (writers now wait for the handler), copied, dropped, and written back with the answer
//! (PUT) — or, when the notice lets it keep a read copy, written back and kept
//! write-protected. A copy is kept at least [`MIN_HOLD`] after it was installed before a
//! notice takes it, so the access that faulted it in runs before it goes (two writers
//! ping-ponging a page both make progress).
//!
//! Copies are leases, one per home shard that granted copies (every grant and renewal names
//! it): the handler renews a lease at half its length while it holds copies from that shard,
//! through one of them, and when one runs out unrenewed (the home unreachable) it drops every
//! copy under it — writing dirty ones back if the home still takes them — at 7/8 of the lease
//! counted from when the renewing request was *sent*, so before the home's own lease (counted
//! from when it arrived) can end. A renewal answered by another shard than the one that
//! granted (the page has migrated) renews nothing of the old one's: those copies are dropped.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;

use super::{AlignedPage, Backing, Handler, PageState, RegionError};
use crate::ClientError;
use crate::copies::Keep;

/// The least time a copy stays after it was installed before a notice takes it.
pub const MIN_HOLD: Duration = Duration::from_micros(50);
/// Waits for the home this short are spun (with frames taken in); longer ones sleep.
const SPIN_WAIT: Duration = Duration::from_micros(40);
/// The longest wait between two tries of a copy the home answered RECALLING for.
const MAX_RETRY_WAIT: Duration = Duration::from_micros(500);

/// How a region's pages relate to other processes' mappings of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Coherence {
    /// The region's copies are its own: nobody else writes its pages (the cheapest).
    #[default]
    Private,
    /// Copies granted by the pages' homes, one writer or many readers per page: other
    /// processes' regions over the same pages see this one's writes and it sees theirs.
    Shared,
}

/// A copy the home granted ([`Copies::get`]); the bytes, if any, are in the page buffer.
#[derive(Debug, Clone, Copy)]
pub struct CopyGrant {
    /// The copy's generation.
    pub generation: u64,
    /// The copy lease, from `asked`.
    pub lease: Duration,
    /// When the request was sent.
    pub asked: Instant,
    /// Whether the buffer holds the page (false: an upgrade of a current read copy).
    pub data: bool,
    /// The home shard that granted it (host id << 8 | shard field), whose lease it is under.
    pub home: u32,
}

/// What a backing must do for a coherent region: the copy requests of §5.18 for page
/// indexes, and the notices that arrive for them.
pub trait Copies {
    /// One GET_SHARED (`exclusive` false) or GET_EXCLUSIVE holding the read copy of
    /// generation `held` (0: none) for page `index`; `Ok(None)` is RECALLING (ask again).
    fn get(
        &mut self,
        index: usize,
        exclusive: bool,
        held: u64,
        page: &mut AlignedPage,
    ) -> Result<Option<CopyGrant>, ClientError>;
    /// PUT: the copy of generation `generation` of page `index` keeps `keep`, writing back
    /// `data`; returns the generation of the copy kept.
    fn put(
        &mut self,
        index: usize,
        generation: u64,
        keep: Keep,
        data: Option<&AlignedPage>,
    ) -> Result<u64, ClientError>;
    /// RENEW through page `index`; returns the lease granted and the home shard that renewed
    /// it (host id << 8 | shard field).
    fn renew(&mut self, index: usize) -> Result<(Duration, u32), ClientError>;
    /// Takes in what arrived (notices among it).
    fn pump(&mut self);
    /// The next REVOKE notice for a page of the region: (index, generation, keep).
    fn take_revoke(&mut self) -> Option<(usize, u64, Keep)>;
    /// Descriptors readable when frames arrive.
    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>>;
    /// READY notices taken in so far (a requester's cue to ask again at once, §5.18).
    fn readies(&self) -> u64;
}

/// Whether generation `a` of a page's copies is later than `b` at the same home: generations
/// count up by one (31 bits, wrapping past `0x7fff_ffff` to 1), so `a` is later if it lies
/// less than half the range ahead. A page that migrated restarts its generations at random:
/// an old home's notice may then look later, which costs one re-fetch, never a copy.
fn later_generation(a: u64, b: u64) -> bool {
    let ahead = a.wrapping_sub(b) & 0x7fff_ffff;
    ahead != 0 && ahead < 1 << 30
}

/// The copy lease of one home shard.
#[derive(Debug, Clone, Copy)]
struct GroupLease {
    /// The home shard (host id << 8 | shard field).
    home: u32,
    /// Copies resident under it.
    copies: u32,
    /// When this client must stop using them (7/8 of the lease after the renewing request
    /// was sent).
    deadline: Instant,
    /// When to renew (half the lease).
    renew_at: Instant,
    /// A page whose copy it granted (RENEW goes to any page of the shard).
    page: usize,
}

/// No lease group.
const NO_GROUP: usize = usize::MAX;

/// The coherence state of a shared region's handler.
#[derive(Debug)]
pub(super) struct Shared {
    generation: Vec<u64>,
    /// Whether the resident copy is the write copy (a flushed write copy is clean but still
    /// the writer's).
    writer: Vec<bool>,
    installed: Vec<Instant>,
    /// The lease group of each resident copy ([`NO_GROUP`]: none).
    group: Vec<usize>,
    groups: Vec<GroupLease>,
    deferred: VecDeque<(Instant, usize, u64, Keep)>,
    /// How long a fault waits for a copy before it fails (SIGBUS).
    wait: Duration,
}

impl Shared {
    pub(super) fn new(pages: usize, wait: Duration) -> Self {
        let now = Instant::now();
        Shared {
            generation: vec![0; pages],
            writer: vec![false; pages],
            installed: vec![now; pages],
            group: vec![NO_GROUP; pages],
            groups: Vec::new(),
            deferred: VecDeque::new(),
            wait,
        }
    }

    /// When the handler must look at its leases or deferred notices next.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        let leases = self
            .groups
            .iter()
            .filter(|g| g.copies > 0)
            .map(|g| g.renew_at.min(g.deadline))
            .min();
        let deferred = self.deferred.iter().map(|d| d.0).min();
        match (leases, deferred) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn copies<B: Backing>(b: &mut B) -> &mut dyn Copies {
    b.copies().expect("a shared region's backing has copies")
}

impl<B: Backing> Handler<B> {
    fn shared(&mut self) -> &mut Shared {
        self.shared.as_mut().expect("a shared region")
    }

    /// Asks for a copy of `page` until the home grants one (answering notices while it
    /// waits), or the wait runs out.
    fn ask_copy(&mut self, page: usize, exclusive: bool) -> Result<CopyGrant, ClientError> {
        let start = Instant::now();
        let wait = self.shared().wait;
        let mut backoff = Duration::from_micros(20);
        loop {
            let readies = copies(&mut self.backing).readies();
            let held = match self.state[page] {
                PageState::Clean if self.lease_valid(page) => self.shared().generation[page],
                _ => 0,
            };
            let got = match copies(&mut self.backing).get(page, exclusive, held, &mut self.buf) {
                // The home's table of copy holders is full for now (§5.18): like RECALLING,
                // wait and ask again.
                Err(ClientError::Busy) => None,
                other => other?,
            };
            match got {
                Some(g) => return Ok(g),
                None => {
                    self.counters.recalls.fetch_add(1, Relaxed);
                    if start.elapsed() > wait {
                        return Err(ClientError::Recalling);
                    }
                    // The other copies' leases run on while this one is waited for (up to
                    // `copy_wait`, many leases). (If this page's own read copy goes, the next
                    // request holds nothing and gets the bytes.)
                    self.tend_copies();
                    if copies(&mut self.backing).readies() != readies {
                        // READY came while the frames were taken in (it woke nobody): the
                        // way is clear, ask again now.
                        continue;
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    }

    /// Waits about `d` taking frames in: spinning for the shortest waits, else sleeping until
    /// a frame arrives (a notice to answer, or the home's READY) or `d` has passed — sleeping,
    /// so the CPU goes to whoever must answer the home (on a machine of few CPUs, the other
    /// holder's handler).
    fn pause(&mut self, d: Duration) {
        if d <= SPIN_WAIT {
            let until = Instant::now() + d;
            let readies = copies(&mut self.backing).readies();
            while Instant::now() < until {
                copies(&mut self.backing).pump();
                if copies(&mut self.backing).readies() != readies {
                    return;
                }
            }
            return;
        }
        {
            let c = self.backing.copies_ref().expect("a shared region");
            let mut polls: Vec<PollFd> = c
                .poll_fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            let _ = ppoll(&mut polls, Some(TimeSpec::from_duration(d)), None);
        }
        copies(&mut self.backing).pump();
    }

    fn lease_valid(&self, page: usize) -> bool {
        let s = self.shared.as_ref().expect("a shared region");
        s.groups
            .get(s.group[page])
            .is_some_and(|g| Instant::now() < g.deadline)
    }

    fn note_grant(&mut self, page: usize, g: &CopyGrant, writer: bool) {
        let s = self.shared();
        s.generation[page] = g.generation;
        s.writer[page] = writer;
        s.installed[page] = Instant::now();
        let group = match s.groups.iter().position(|l| l.home == g.home) {
            Some(i) => i,
            None => {
                s.groups.push(GroupLease {
                    home: g.home,
                    copies: 0,
                    deadline: g.asked,
                    renew_at: g.asked,
                    page,
                });
                s.groups.len() - 1
            }
        };
        if s.group[page] != group {
            if let Some(old) = s.groups.get_mut(s.group[page]) {
                old.copies = old.copies.saturating_sub(1);
            }
            s.groups[group].copies += 1;
            s.group[page] = group;
        }
        let l = &mut s.groups[group];
        l.page = page;
        l.deadline = l.deadline.max(g.asked + g.lease * 7 / 8);
        l.renew_at = l.renew_at.max(g.asked + g.lease / 2);
    }

    fn note_dropped(&mut self, page: usize) {
        let s = self.shared();
        s.writer[page] = false;
        if let Some(l) = s.groups.get_mut(s.group[page]) {
            l.copies = l.copies.saturating_sub(1);
        }
        s.group[page] = NO_GROUP;
    }

    /// A missing-page fault in a shared region: a copy into the buffer (the caller installs
    /// it; a write fault gets the write copy).
    pub(super) fn fetch_copy(&mut self, page: usize, write: bool) -> Result<(), RegionError> {
        let g = self.ask_copy(page, write).map_err(|e| RegionError::Fetch {
            page,
            source: Box::new(e),
        })?;
        self.note_grant(page, &g, write);
        Ok(())
    }

    /// The first write to a read copy (or to a flushed write copy): the write copy.
    pub(super) fn upgrade(&mut self, page: usize) {
        if self.shared().writer[page] {
            // Still the writer's (flushed since): just writable again.
            self.state[page] = PageState::Dirty;
            self.unprotect(page);
            return;
        }
        self.counters.write_faults.fetch_add(1, Relaxed);
        self.counters.upgrades.fetch_add(1, Relaxed);
        let g = match self.ask_copy(page, true) {
            Ok(g) => g,
            Err(e) => {
                // The write cannot go ahead: the access gets SIGBUS.
                self.report(RegionError::Fetch {
                    page,
                    source: Box::new(e),
                });
                if self.state[page] == PageState::Clean {
                    self.drop_resident(page);
                }
                self.poison(page);
                return;
            }
        };
        let resident = self.state[page] == PageState::Clean;
        if !g.data && resident {
            self.note_grant(page, &g, true);
            self.state[page] = PageState::Dirty;
            self.unprotect(page);
            return;
        }
        // New bytes (the read copy was stale or revoked meanwhile): install them writable.
        if resident {
            self.drop_resident(page);
        }
        self.note_grant(page, &g, true);
        self.state[page] = PageState::Dirty;
        self.resident.push_back(page);
        self.publish_resident();
        if let Err(errno) = self
            .faults
            .install(&self.mapping, page, &self.buf.0, false, true)
        {
            // The home's copy holds the bytes (a clean read copy was upgraded): nothing is lost
            // with the write copy, and the writer gets SIGBUS instead of waiting for ever.
            self.report(RegionError::Kernel {
                call: "UFFDIO_COPY",
                page,
                errno,
            });
            self.resident.retain(|&p| p != page);
            self.publish_resident();
            self.poison(page);
        }
    }

    /// Drops resident `page`'s memory (its next access faults) and forgets it as resident.
    fn drop_resident(&mut self, page: usize) {
        if let Err(e) = self.mapping.discard(page) {
            self.report(RegionError::Kernel {
                call: "madvise(MADV_DONTNEED)",
                page,
                errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            });
        }
        self.resident.retain(|&p| p != page);
        self.publish_resident();
        self.state[page] = PageState::Missing;
        self.note_dropped(page);
    }

    /// Gives resident `page`'s copy back to its home: a read copy is dropped first, the write
    /// copy protected, copied, dropped and written back. `keep` Read keeps it as a read copy
    /// (written back, write-protected). Failures are reported; the copy is gone either way.
    pub(super) fn give_back(&mut self, page: usize, generation: u64, keep: Keep) {
        let mut dirty = self.state[page] == PageState::Dirty;
        if dirty {
            match self.faults.protect(&self.mapping, page) {
                // SAFETY: resident (the handler's bookkeeping) and write-protected just now.
                #[allow(unsafe_code, reason = "the copy's preconditions hold: see above")]
                Ok(()) => unsafe { self.mapping.read_present(page, &mut self.buf.0) },
                Err(errno) => {
                    // Writers cannot be stopped, so no copy of the page can be trusted: it is
                    // dropped unread, its writes since the last write-back are lost (counted).
                    self.report(RegionError::Kernel {
                        call: "UFFDIO_WRITEPROTECT",
                        page,
                        errno,
                    });
                    self.counters.lost_writes.fetch_add(1, Relaxed);
                    dirty = false;
                    if keep == Keep::Read {
                        self.drop_resident(page);
                        let _ =
                            copies(&mut self.backing).put(page, generation, Keep::Nothing, None);
                        return;
                    }
                }
            }
        }
        // A reader asked to keep a read copy (the notice was for a writer) changes nothing.
        let keeps = keep == Keep::Read;
        if !keeps {
            self.drop_resident(page);
        }
        let data = dirty.then_some(&*self.buf);
        let r = copies(&mut self.backing).put(page, generation, keep, data);
        if dirty {
            self.counters.writebacks.fetch_add(1, Relaxed);
        }
        match r {
            Ok(g) if keeps => {
                self.state[page] = PageState::Clean;
                let s = self.shared();
                s.generation[page] = g;
                s.writer[page] = false;
            }
            Ok(_) => {}
            Err(e) => {
                if dirty {
                    self.counters.lost_writes.fetch_add(1, Relaxed);
                }
                if keeps {
                    self.drop_resident(page);
                }
                self.report(RegionError::WriteBack {
                    page,
                    source: Box::new(e),
                });
            }
        }
    }

    /// What the handler owes its copies whenever it waits, for a fault or for work: the
    /// notices answered, the leases renewed — or the copies of a lease that ran out dropped,
    /// as one kept past its lease may be stale.
    pub(super) fn tend_copies(&mut self) {
        self.serve_revokes();
        self.check_leases();
    }

    /// Answers the REVOKE notices that have arrived (and deferred ones now due).
    fn serve_revokes(&mut self) {
        copies(&mut self.backing).pump();
        let now = Instant::now();
        loop {
            let next = match self.shared().deferred.front() {
                Some(&(due, i, g, k)) if due <= now => {
                    self.shared().deferred.pop_front();
                    Some((i, g, k))
                }
                _ => copies(&mut self.backing).take_revoke(),
            };
            let Some((page, generation, keep)) = next else {
                return;
            };
            if matches!(self.state[page], PageState::Clean | PageState::Dirty) {
                let s = self.shared();
                let ours = s.generation[page];
                if ours == generation {
                    let due = s.installed[page] + MIN_HOLD;
                    if now < due {
                        s.deferred.push_back((due, page, generation, keep));
                        continue;
                    }
                    self.counters.revokes.fetch_add(1, Relaxed);
                    self.give_back(page, generation, keep);
                    continue;
                }
                if !(later_generation(generation, ours) && self.state[page] == PageState::Clean) {
                    continue; // an old notice: this copy came later
                }
                // The home counts this client as the holder of a later copy: it granted one
                // (an upgrade of this read copy) whose reply never came, and answered the
                // request's retransmission RECALLING. Ignored, the notice would hold up its
                // sender for as long as this client keeps asking (each request renews its
                // lease): the stale read copy goes, and the later one is released below like
                // any copy not held.
                self.drop_resident(page);
            }
            // Nothing here (a copy given up, or granted by a reply that never came; Fetching,
            // Staged and WritingBack are private regions' states): say so, so the home stops
            // counting it.
            self.counters.revokes.fetch_add(1, Relaxed);
            let _ = copies(&mut self.backing).put(page, generation, Keep::Nothing, None);
        }
    }

    /// Renews the leases due, and drops the copies of a lease that ran out.
    fn check_leases(&mut self) {
        let now = Instant::now();
        for group in 0..self.shared().groups.len() {
            let l = self.shared().groups[group];
            if l.copies == 0 {
                continue;
            }
            if now >= l.deadline {
                self.lapse(group);
                continue;
            }
            if now < l.renew_at {
                continue;
            }
            let asked = Instant::now();
            match copies(&mut self.backing).renew(l.page) {
                Ok((lease, home)) if home == l.home => {
                    let l = &mut self.shared().groups[group];
                    l.deadline = asked + lease * 7 / 8;
                    l.renew_at = asked + lease / 2;
                }
                // Another shard answered (the page migrated): the old lease is not renewed.
                Ok(_) | Err(ClientError::LeaseExpired) => self.lapse(group),
                // The home does not know the page any more (restarted, or freed): its copies
                // are void.
                Err(
                    ClientError::InvalidHandle | ClientError::StaleHandle | ClientError::Forbidden,
                ) => self.lapse(group),
                Err(e) => {
                    // Try again shortly; the deadline stands.
                    self.shared().groups[group].renew_at = now + Duration::from_millis(10);
                    self.report(RegionError::Fetch {
                        page: l.page,
                        source: Box::new(e),
                    });
                }
            }
        }
    }

    /// The lease of `group` ran out: its copies may not be used any more.
    fn lapse(&mut self, group: usize) {
        self.counters.lapses.fetch_add(1, Relaxed);
        let pages: Vec<usize> = self
            .resident
            .iter()
            .copied()
            .filter(|&p| self.shared.as_ref().is_some_and(|s| s.group[p] == group))
            .collect();
        for p in pages {
            let g = self.shared().generation[p];
            self.give_back(p, g, Keep::Nothing);
        }
        self.shared().groups[group].copies = 0;
    }

    /// Writes write copy `page` back from the page buffer, keeping it: it stays the writer's
    /// (clean and write-protected, the next write faults and makes it writable again without
    /// asking the home; see `upgrade`).
    pub(super) fn store_copy(&mut self, page: usize) -> Result<(), RegionError> {
        let g = self.shared().generation[page];
        copies(&mut self.backing)
            .put(page, g, Keep::Write, Some(&self.buf))
            .map(|_| ())
            .map_err(|e| RegionError::WriteBack {
                page,
                source: Box::new(e),
            })
    }

    /// Gives every copy back (closing the region).
    pub(super) fn release_all(&mut self) {
        let pages: Vec<usize> = self.resident.iter().copied().collect();
        for p in pages {
            let g = self.shared().generation[p];
            self.give_back(p, g, Keep::Nothing);
        }
    }
}

impl<B: Backing> Handler<B> {
    /// The generation of resident `page`'s copy.
    pub(super) fn shared_generation(&self, page: usize) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.generation[page])
    }
}

#[cfg(test)]
mod tests {
    use super::later_generation;

    #[test]
    fn later_generations_count_up_and_wrap() {
        assert!(later_generation(6, 5));
        assert!(!later_generation(5, 6));
        assert!(!later_generation(5, 5));
        // 0x7fff_ffff is followed by 1.
        assert!(later_generation(1, 0x7fff_ffff));
        assert!(!later_generation(0x7fff_ffff, 1));
        // A generation restarted at random (a migrated page) is later or not by half the range.
        assert!(!later_generation(3, 3 + (1 << 30)));
    }
}
