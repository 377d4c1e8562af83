//! Shared regions over a home scripted in memory, for what a real home does only under
//! rare timing.
//!
//! - A lost upgrade grant: the home granted the write copy (a later generation) to a reader,
//!   the reply was lost, and the retransmission was answered RECALLING because another
//!   writer's drain had begun. The home's notices then name a generation later than the
//!   reader's copy. The region must drop its stale copy and release the generation named
//!   (docs/protocol.md, "Why every message may be lost…"); ignoring the notices as old held
//!   the other writer up for as long as the reader kept asking (CI's litmus and migration
//!   tests stalled 10 s, then the access got SIGBUS).
//! - A long wait for one copy: while a fault waits (up to `copy_wait`) the leases of the
//!   region's other copies must still be renewed, or those copies dropped when one runs out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluebridge_client::region::{
    AlignedPage, Backing, BackingError, Coherence, Copies, CopyGrant, HandlerCpu, PagedRegion,
    ReadVolatile, WriteVolatile,
};
use bluebridge_client::{ClientError, Keep, RegionOptions};

/// What the reader's copy is before the upgrade, and what the home (wrongly, from the
/// client's view) counts it as holding afterwards.
const READ_GEN: u64 = 5;
const LOST_GEN: u64 = 6;
const LEASE: Duration = Duration::from_secs(1);
/// The lease of the long-wait test: the wait for page 1 lasts four of them.
const SHORT_LEASE: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Home {
    /// The PUTs the region sent: (page, generation, keep).
    puts: Vec<(usize, u64, Keep)>,
    /// Notices on their way to the region.
    notices: VecDeque<(usize, u64, Keep)>,
    /// GET_EXCLUSIVEs answered RECALLING.
    recalled: u32,
    /// The write copy granted at last.
    granted: Option<u64>,
    /// RENEWs received, and when.
    renews: Vec<Instant>,
    /// Until when GETs of page 1 are answered RECALLING (set by the first).
    recall_until: Option<Instant>,
}

/// How the home answers a GET: (state, page index, exclusive, the page buffer) → a grant, or
/// `None` for RECALLING.
type Script = fn(&mut Home, usize, bool, &mut AlignedPage) -> Option<CopyGrant>;

/// A home whose GETs `script` answers.
#[derive(Clone)]
struct ScriptedHome {
    home: Arc<Mutex<Home>>,
    script: Script,
}

impl ScriptedHome {
    fn new(script: Script) -> Self {
        ScriptedHome {
            home: Arc::default(),
            script,
        }
    }

    /// The home's state (also after a failed assertion elsewhere poisoned the lock).
    fn lock(&self) -> std::sync::MutexGuard<'_, Home> {
        self.home
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Backing for ScriptedHome {
    fn fetch(&mut self, _: usize, _: &mut AlignedPage) -> Result<(), BackingError> {
        Err("a shared region fetches copies".into())
    }
    fn store(&mut self, _: usize, _: &AlignedPage) -> Result<(), BackingError> {
        Err("a shared region writes copies back".into())
    }
    fn close(&mut self, _free: bool) -> Result<(), BackingError> {
        Ok(())
    }
    fn copies(&mut self) -> Option<&mut dyn Copies> {
        Some(self)
    }
    fn copies_ref(&self) -> Option<&dyn Copies> {
        Some(self)
    }
}

fn grant(generation: u64, page: &mut AlignedPage, byte: u8, lease: Duration) -> Option<CopyGrant> {
    page.0.fill(byte);
    Some(CopyGrant {
        generation,
        lease,
        asked: Instant::now(),
        data: true,
        home: 1,
    })
}

/// A one-page home: GET_SHARED grants generation 5; the first GET_EXCLUSIVE's grant (6) is
/// "lost", so every GET_EXCLUSIVE is answered RECALLING, with another writer's notice for
/// generation 6, until the region releases 6; then the write copy is generation 7.
fn lost_grant(
    h: &mut Home,
    _: usize,
    exclusive: bool,
    page: &mut AlignedPage,
) -> Option<CopyGrant> {
    if !exclusive {
        return grant(READ_GEN, page, 0x11, LEASE);
    }
    let released = h
        .puts
        .iter()
        .any(|&(_, g, k)| g == LOST_GEN && k == Keep::Nothing);
    if released {
        h.granted = Some(LOST_GEN + 1);
        return grant(LOST_GEN + 1, page, 0x11, LEASE);
    }
    // The home holds generation 6 for this client; the other writer's GET sends the notice
    // again.
    h.recalled += 1;
    h.notices.push_back((0, LOST_GEN, Keep::Nothing));
    None
}

impl Copies for ScriptedHome {
    fn get(
        &mut self,
        index: usize,
        exclusive: bool,
        _held: u64,
        page: &mut AlignedPage,
    ) -> Result<Option<CopyGrant>, ClientError> {
        let script = self.script;
        Ok(script(&mut self.lock(), index, exclusive, page))
    }

    fn put(
        &mut self,
        index: usize,
        generation: u64,
        keep: Keep,
        _data: Option<&AlignedPage>,
    ) -> Result<u64, ClientError> {
        self.lock().puts.push((index, generation, keep));
        Ok(generation)
    }

    fn renew(&mut self, _index: usize) -> Result<(Duration, u32), ClientError> {
        self.lock().renews.push(Instant::now());
        Ok((SHORT_LEASE, 1))
    }

    fn pump(&mut self) {}

    fn take_revoke(&mut self) -> Option<(usize, u64, Keep)> {
        self.lock().notices.pop_front()
    }

    fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        Vec::new()
    }

    fn readies(&self) -> u64 {
        0
    }
}

/// A shared region of `pages` pages over `home`; a fault waits 3 s for a copy at most.
fn shared_region(home: &ScriptedHome, pages: usize) -> PagedRegion<ScriptedHome> {
    PagedRegion::with_backing(
        home.clone(),
        pages,
        RegionOptions {
            coherence: Coherence::Shared,
            handler_cpu: HandlerCpu::Any,
            copy_wait: Duration::from_secs(3),
            ..RegionOptions::default()
        },
    )
    .expect("region (needs root or vm.unprivileged_userfaultfd=1)")
}

/// An unlinked file holding `contents`, open for reading and writing at its start: bytes
/// moved between it and the region by a system call are touched by the kernel, so a fault
/// that fails is the call's EFAULT, not the test's SIGBUS.
fn scratch_file(name: &str, contents: &[u8]) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("bb-{name}-{}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn a_notice_for_a_later_generation_releases_it_and_the_write_goes_ahead() {
    let home = ScriptedHome::new(lost_grant);
    let region = shared_region(&home, 1);
    // A read: the read copy of generation 5.
    let words = region.as_atomic_words();
    assert_eq!(
        words[0].load(std::sync::atomic::Ordering::SeqCst),
        0x1111_1111_1111_1111
    );
    // A write through a system call (see `scratch_file`): the upgrade meets the lost grant.
    let mut src = scratch_file("lost-grant", &[0xab; 8]);
    let started = Instant::now();
    let wrote = src.read_volatile(&mut region.as_volatile().subslice(0, 8).unwrap());
    let waited = started.elapsed();
    let h = home.lock();
    assert_eq!(
        wrote.map_err(|e| e.to_string()),
        Ok(8),
        "the write after {waited:?}; PUTs {:?}, {} RECALLING answers",
        h.puts,
        h.recalled
    );
    assert!(
        h.puts.contains(&(0, LOST_GEN, Keep::Nothing)),
        "generation 6 released: {:?}",
        h.puts
    );
    assert_eq!(h.granted, Some(LOST_GEN + 1));
    assert!(
        waited < Duration::from_secs(1),
        "the write waited {waited:?}"
    );
    drop(h);
    assert_eq!(
        words[0].load(std::sync::atomic::Ordering::SeqCst),
        0xabab_abab_abab_abab,
        "the written bytes are in the write copy"
    );
    assert!(region.stats().revokes >= 1, "{:?}", region.stats());
}

/// A two-page home: read copies of generation 5 under a 200 ms lease; the GETs of page 1 are
/// answered RECALLING for four leases from the first.
fn slow_page_one(h: &mut Home, index: usize, _: bool, page: &mut AlignedPage) -> Option<CopyGrant> {
    if index == 1 {
        let until = *h
            .recall_until
            .get_or_insert_with(|| Instant::now() + 4 * SHORT_LEASE);
        if Instant::now() < until {
            h.recalled += 1;
            return None;
        }
    }
    grant(READ_GEN, page, 0x20 + index as u8, SHORT_LEASE)
}

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn a_long_wait_for_one_copy_renews_the_leases_of_the_others() {
    let home = ScriptedHome::new(slow_page_one);
    let region = shared_region(&home, 2);
    let words = region.as_atomic_words();
    let per_page = 4096 / 8;
    // Page 0: a read copy under the short lease.
    assert_eq!(
        words[0].load(std::sync::atomic::Ordering::SeqCst),
        0x2020_2020_2020_2020
    );
    // Page 1, read through a system call: its home recalls for four leases.
    let mut dst = scratch_file("long-wait", &[]);
    let started = Instant::now();
    let wrote = dst.write_volatile(&region.as_volatile().subslice(4096, 8).unwrap());
    let waited = started.elapsed();
    let h = home.lock();
    assert_eq!(
        wrote.map_err(|e| e.to_string()),
        Ok(8),
        "page 1 after {waited:?}, {} RECALLING answers",
        h.recalled
    );
    assert!(waited >= 3 * SHORT_LEASE, "page 1 came after {waited:?}");
    // Page 0's lease was renewed while page 1 was waited for (every half lease), so its copy
    // stayed and nothing was given back.
    let during = h
        .renews
        .iter()
        .filter(|&&t| t >= started && t <= started + waited)
        .count();
    assert!(
        during >= 3,
        "{during} RENEWs during the {waited:?} wait (renews at {:?}); PUTs {:?}",
        h.renews,
        h.puts
    );
    assert!(h.puts.is_empty(), "copies given back: {:?}", h.puts);
    drop(h);
    assert_eq!(
        words[per_page].load(std::sync::atomic::Ordering::SeqCst),
        0x2121_2121_2121_2121
    );
    assert_eq!(region.stats().lapses, 0, "{:?}", region.stats());
}
