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
/// Why SCHED_IDLE: on veth (and in AF_XDP copy mode generally) frames are delivered by the
/// kernel's softirq work, which normally runs at the end of our own `sendto`; once the kernel
/// defers it to `ksoftirqd`, a busy-polling thread of normal priority keeps `ksoftirqd` off
/// its CPU for up to a scheduler slice (4 ms stalls measured here once; on kernel 6.18 the
/// open-loop p99 at 50k READs/s was 1.2–1.5 ms at normal priority against 0.8–0.9 ms under
/// SCHED_IDLE). Under SCHED_IDLE any woken thread preempts the poller at once — but so does any
/// CPU-bound process, which then starves the poller almost completely: a poller that finds
/// itself starved is moved out of it with [`leave_sched_idle`].
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

/// The calling thread's Linux thread id (for [`leave_sched_idle`] from another thread).
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Moves thread `tid` (a Linux thread id) from SCHED_IDLE to normal priority, nice 0: for a
/// poller that a CPU-bound neighbour starves (a starved thread cannot be relied on to do it
/// itself: under SCHED_IDLE beside a busy process it may not run for a second).
pub fn leave_sched_idle(tid: i32) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on a thread id with a valid parameter struct.
    let r = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; PRIO_PROCESS with a thread id sets that thread's nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
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
            leave_sched_idle(current_tid()).unwrap();
            // The kernel's view (glibc caches what pthread_setschedparam set).
            // SAFETY: a plain system call about the calling thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!((policy, nice), (libc::SCHED_OTHER, 0));
            assert!(matches!(
                busy_poll_thread(Some(100_000), false),
                Err(BusyPollError::Pin(100_000))
            ));
        })
        .join()
        .unwrap();
    }
}
