//! Daemons a topology runs (FRR's routers, Open vSwitch) as child processes inside its
//! namespaces: stopped with SIGTERM on drop (SIGKILL after 3 s), also when a test panics.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TopologyError;

/// A daemon running in the foreground of a child process; stopped on drop.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    /// Starts `program args` in namespace `ns` (`ip netns exec`), its output appended to
    /// `log`, `env` set.
    pub fn spawn(
        ns: &str,
        program: &str,
        args: &[&str],
        env: &[(&str, &Path)],
        log: &Path,
    ) -> Result<Daemon, TopologyError> {
        let failed = |e: std::io::Error| TopologyError::Command {
            cmd: format!("ip netns exec {ns} {program}"),
            stderr: e.to_string(),
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(failed)?;
        let err = out.try_clone().map_err(failed)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(failed)?;
        Ok(Daemon {
            name: format!("{program} in {ns}"),
            child,
        })
    }

    /// Fails if it has exited.
    pub fn check(&mut self) -> Result<(), TopologyError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(TopologyError::Command {
                cmd: self.name.clone(),
                stderr: format!("exited ({st})"),
            }),
            Err(e) => Err(TopologyError::Command {
                cmd: self.name.clone(),
                stderr: e.to_string(),
            }),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(daemon = %self.name, "did not stop on SIGTERM; killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills what an earlier run that died without cleaning up left running from `dir`: every
/// process named in a `*.pid` file there whose command line still names that file's daemon
/// (so a reused pid is spared).
pub(crate) fn kill_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let (Some(daemon), Some("pid")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid > 1 && String::from_utf8_lossy(&cmdline).contains(daemon) {
            tracing::warn!(daemon, pid, dir = %dir.display(), "killing a daemon left by an earlier run");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Waits until `ready` holds (every 10 ms, `timeout` at most), checking `daemons` are alive.
pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    daemons: &mut [Daemon],
    mut ready: impl FnMut() -> bool,
) -> Result<(), TopologyError> {
    let t = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        for d in daemons.iter_mut() {
            d.check()?;
        }
        if t.elapsed() > timeout {
            return Err(TopologyError::Command {
                cmd: what.to_owned(),
                stderr: format!("not ready after {timeout:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
