//! A shared region whose upgrade grant never arrived: the home granted the write copy (a later
//! generation) to a reader, the reply was lost, and the retransmission was answered RECALLING
//! because another writer's drain had begun. The home's notices then name a generation later
//! than the reader's copy. The region must drop its stale copy and release the generation
//! named (docs/protocol.md, "Why every message may be lost…"); ignoring the notices as old
//! held the other writer up for as long as the reader kept asking (CI's litmus and migration
//! tests stalled 10 s, then the access got SIGBUS). The home here is scripted, in memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluebridge_client::region::{
    AlignedPage, Backing, BackingError, Coherence, Copies, CopyGrant, HandlerCpu, PagedRegion,
    ReadVolatile,
};
use bluebridge_client::{ClientError, Keep, RegionOptions};

/// What the reader's copy is before the upgrade, and what the home (wrongly, from the
/// client's view) counts it as holding afterwards.
const READ_GEN: u64 = 5;
const LOST_GEN: u64 = 6;
const LEASE: Duration = Duration::from_secs(1);

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
}

/// A one-page home: GET_SHARED grants generation 5; the first GET_EXCLUSIVE's grant (6) is
/// "lost", so every GET_EXCLUSIVE is answered RECALLING, with another writer's notice for
/// generation 6, until the region releases 6; then the write copy is generation 7.
#[derive(Clone, Default)]
struct ScriptedHome(Arc<Mutex<Home>>);

impl ScriptedHome {
    /// The home's state (also after a failed assertion elsewhere poisoned the lock).
    fn lock(&self) -> std::sync::MutexGuard<'_, Home> {
        self.0
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

fn grant(generation: u64, page: &mut AlignedPage, byte: u8) -> Option<CopyGrant> {
    page.0.fill(byte);
    Some(CopyGrant {
        generation,
        lease: LEASE,
        asked: Instant::now(),
        data: true,
        home: 1,
    })
}

impl Copies for ScriptedHome {
    fn get(
        &mut self,
        _index: usize,
        exclusive: bool,
        _held: u64,
        page: &mut AlignedPage,
    ) -> Result<Option<CopyGrant>, ClientError> {
        let mut h = self.lock();
        if !exclusive {
            return Ok(grant(READ_GEN, page, 0x11));
        }
        let released = h
            .puts
            .iter()
            .any(|&(_, g, k)| g == LOST_GEN && k == Keep::Nothing);
        if released {
            h.granted = Some(LOST_GEN + 1);
            return Ok(grant(LOST_GEN + 1, page, 0x11));
        }
        // The home holds generation 6 for this client; the other writer's GET sends the
        // notice again.
        h.recalled += 1;
        h.notices.push_back((0, LOST_GEN, Keep::Nothing));
        Ok(None)
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
        Ok((LEASE, 1))
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

#[test]
#[cfg_attr(
    unprivileged,
    ignore = "needs root (userfaultfd with kernel faults): run as root or `cargo xtask test`"
)]
fn a_notice_for_a_later_generation_releases_it_and_the_write_goes_ahead() {
    let home = ScriptedHome::default();
    let region = PagedRegion::with_backing(
        home.clone(),
        1,
        RegionOptions {
            coherence: Coherence::Shared,
            handler_cpu: HandlerCpu::Any,
            copy_wait: Duration::from_secs(3),
            ..RegionOptions::default()
        },
    )
    .expect("region (needs root or vm.unprivileged_userfaultfd=1)");
    // A read: the read copy of generation 5.
    let words = region.as_atomic_words();
    assert_eq!(
        words[0].load(std::sync::atomic::Ordering::SeqCst),
        0x1111_1111_1111_1111
    );
    // A write through a syscall (the kernel writes the page: a failed upgrade is EFAULT, not
    // SIGBUS): the upgrade meets the lost grant.
    let path = std::env::temp_dir().join(format!("bb-lost-grant-{}", std::process::id()));
    std::fs::write(&path, [0xab; 8]).unwrap();
    let mut src = std::fs::File::open(&path).unwrap();
    let _ = std::fs::remove_file(&path);
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
