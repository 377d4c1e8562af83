//! What the demo and the bench share: a hugepage reservation undone on drop, and a
//! `bluebridge-server` process in a namespace, interrupted (then killed) on drop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::stage::Stages;

const HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A flag set by SIGINT or SIGTERM, so the caller can clean up instead of dying.
pub(crate) fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let f = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, f.clone())?;
    }
    Ok(f)
}

/// CPUs for (client, server): different ones when there are two.
pub(crate) fn cores() -> (usize, usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n >= 2 { (0, 1) } else { (0, 0) }
}

/// Raises the hugepage reservation and puts the old value back on drop.
pub(crate) struct Hugepages {
    before: u64,
}

impl Hugepages {
    pub(crate) fn reserve(extra: u64) -> Result<Self> {
        let before: u64 = std::fs::read_to_string(HUGEPAGES)?.trim().parse()?;
        std::fs::write(HUGEPAGES, (before + extra).to_string()).context("reserving hugepages")?;
        let now: u64 = std::fs::read_to_string(HUGEPAGES)?.trim().parse()?;
        println!(
            "      hugepages: {before} -> {now} reserved (asked {}){}",
            before + extra,
            if now < before + extra {
                "; the rest falls back to ordinary pages"
            } else {
                ""
            }
        );
        Ok(Hugepages { before })
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(HUGEPAGES, self.before.to_string()) {
            eprintln!("xtask: restoring {HUGEPAGES} to {}: {e}", self.before);
        }
    }
}

/// The server process; interrupted (then killed) on drop.
pub(crate) struct ServerProc {
    child: Child,
    pub(crate) output: mpsc::Receiver<String>,
}

impl ServerProc {
    pub(crate) fn interrupt(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < wait {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.interrupt(Duration::from_secs(5));
        }
    }
}

impl ServerProc {
    /// Starts `bin args…` in namespace `ns`, echoes its output, and waits for its banner line.
    pub(crate) fn start(
        ns: &str,
        bin: &Path,
        args: &[String],
        interrupted: &AtomicBool,
    ) -> Result<Self> {
        Self::start_with(ns, bin, args, interrupted, true)
    }

    /// Like [`ServerProc::start`], without echoing the server's output (for many servers).
    pub(crate) fn start_quiet(
        ns: &str,
        bin: &Path,
        args: &[String],
        interrupted: &AtomicBool,
    ) -> Result<Self> {
        Self::start_with(ns, bin, args, interrupted, false)
    }

    fn start_with(
        ns: &str,
        bin: &Path,
        args: &[String],
        interrupted: &AtomicBool,
        echo: bool,
    ) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(if echo {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .context("starting the server")?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if echo {
                    println!("      server | {line}");
                }
                let _ = tx.send(line);
            }
        });
        let mut p = ServerProc { child, output: rx };
        let t = Instant::now();
        loop {
            if let Ok(line) = p.output.recv_timeout(Duration::from_millis(100))
                && line.starts_with("bluebridge-server:")
            {
                return Ok(p);
            }
            if let Ok(Some(st)) = p.child.try_wait() {
                bail!("the server exited during start-up: {st}");
            }
            if t.elapsed() > Duration::from_secs(30) || interrupted.load(Ordering::Relaxed) {
                bail!("the server did not come up");
            }
        }
    }

    /// Its process id (the server's own: `ip netns exec` execs it).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server as a crash would (SIGKILL: nothing of it runs after).
    pub(crate) fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Stops the server with SIGINT; an error unless it exits cleanly.
    pub(crate) fn stop(mut self) -> Result<()> {
        match self.interrupt(Duration::from_secs(10)) {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("the server exited with {st}"),
            None => bail!("the server did not stop on SIGINT; killed"),
        }
    }
}

/// What every run starts with: Debian packages (unless `no_packages`), a release build of
/// `packages`, removal of the namespaces a killed earlier run left under `ns_prefix`, and a
/// reservation of `hugepages` more 2 MiB pages (undone when the guard drops).
pub(crate) fn prepare(
    s: &mut Stages,
    no_packages: bool,
    packages: &[&str],
    ns_prefix: &str,
    hugepages: u64,
) -> Result<Hugepages> {
    if !no_packages {
        s.run("debian packages", crate::packages::ensure)?;
    }
    s.run(
        &format!("build {} (release)", packages.join(" and ")),
        || {
            let mut cmd = crate::cargo();
            cmd.args(["build", "--release", "--locked"]);
            for p in packages {
                cmd.args(["-p", p]);
            }
            crate::stage::status(&mut cmd)
        },
    )?;
    for ns in bluebridge_topology::namespaces_with_prefix(ns_prefix) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    Hugepages::reserve(hugepages)
}
