//! The pages the switch reported freed lately, so a report that comes twice is acted on once.
//!
//! The switch reports every FREE it sees answered OK; a client that retransmits a FREE whose
//! reply was slow gets OK again from the server's session table, and the switch reports the
//! page again. A freed page's address never names a page again (handles are not reused), so
//! remembering addresses is exact; the oldest are forgotten past [`RECENT_MAX`].

use std::collections::{HashSet, VecDeque};
use std::net::Ipv6Addr;

/// Freed pages remembered, at most (as many as a client remembers notices).
pub(crate) const RECENT_MAX: usize = 1 << 16;

#[derive(Debug, Default)]
pub(crate) struct RecentlyFreed {
    order: VecDeque<Ipv6Addr>,
    set: HashSet<Ipv6Addr>,
    /// Reports of a page already notified, ignored.
    pub(crate) repeats: u64,
}

impl RecentlyFreed {
    /// Whether `page` is reported for the first time (remembering it).
    pub(crate) fn first(&mut self, page: Ipv6Addr) -> bool {
        if !self.set.insert(page) {
            self.repeats += 1;
            return false;
        }
        self.order.push_back(page);
        if self.order.len() > RECENT_MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_counts_once_and_the_oldest_are_forgotten() {
        let mut r = RecentlyFreed::default();
        let a = |i: u32| Ipv6Addr::from(u128::from(i));
        assert!(r.first(a(1)));
        assert!(!r.first(a(1)));
        assert_eq!(r.repeats, 1);
        for i in 2..=RECENT_MAX as u32 + 1 {
            assert!(r.first(a(i)));
        }
        assert!(r.first(a(1)), "forgotten after RECENT_MAX newer ones");
        assert!(!r.first(a(RECENT_MAX as u32 + 1)));
    }
}
