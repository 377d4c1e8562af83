//! Setting up a thread that busy-polls a socket.

/// A busy-poll thread could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BusyPollError {
    /// The core does not exist or the thread may not run there.
    #[error("cannot pin the thread to CPU {0} (no such CPU, or not allowed)")]
    Pin(usize),
    /// The scheduling policy could not be changed.
    #[error("cannot switch the thread to SCHED_IDLE: {0:?}")]
    Policy(thread_priority::Error),
}

/// Prepares the calling thread for busy-polling: pins it to `core` (if given) and, with
/// `sched_idle`, runs it under SCHED_IDLE.
///
/// SCHED_IDLE and its price: on veth (and in AF_XDP copy mode generally) frames are delivered
/// by the kernel's softirq work, which normally runs at the end of our own `sendto`; once the
/// kernel defers it to `ksoftirqd`, a busy-polling thread of normal priority could keep
/// `ksoftirqd` off its CPU for a scheduler slice (~4 ms stalls, measured here once).
/// Under SCHED_IDLE any woken thread preempts the poller at once — but so does any CPU-bound
/// process, which then starves the poller almost completely. Measured again on kernel 6.18 (EEVDF),
/// normal priority showed no such stalls and as much throughput, so the servers and the client
/// default to it; the load generator keeps SCHED_IDLE on its own dedicated cores.
pub fn busy_poll_thread(core: Option<usize>, sched_idle: bool) -> Result<(), BusyPollError> {
    if let Some(id) = core {
        // core_affinity panics (in libc's CPU_SET) for ids beyond the CPU set: check first.
        let known = core_affinity::get_core_ids().unwrap_or_default();
        if !known.iter().any(|c| c.id == id)
            || !core_affinity::set_for_current(core_affinity::CoreId { id })
        {
            return Err(BusyPollError::Pin(id));
        }
    }
    if sched_idle {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        )
        .map_err(BusyPollError::Policy)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_idle_and_pinning() {
        std::thread::spawn(|| {
            busy_poll_thread(Some(0), true).unwrap();
            let policy = thread_priority::unix::thread_schedule_policy().unwrap();
            assert_eq!(
                policy,
                thread_priority::ThreadSchedulePolicy::Normal(
                    thread_priority::NormalThreadSchedulePolicy::Idle
                )
            );
            assert!(matches!(
                busy_poll_thread(Some(100_000), false),
                Err(BusyPollError::Pin(100_000))
            ));
        })
        .join()
        .unwrap();
    }
}
