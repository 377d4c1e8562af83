//! What the load generator refuses or cuts short, checked against real servers in the bench
//! run's topology (behaviour, no timing): results that cannot be written fail before the run,
//! `--echo` against a server that is not an echo fails, and a server that dies mid-run ends
//! the run at once instead of at its scheduled end.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::Lab;
use crate::lab::ServerProc;
use crate::stage::Stages;

/// Runs `cmd` to its end (`within` at most, else killed) and returns its exit status and
/// everything it wrote.
fn finish(mut cmd: Command, within: Duration) -> Result<(std::process::ExitStatus, String)> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting bluebridge-bench")?;
    wait_output(child, within)
}

fn wait_output(
    mut child: std::process::Child,
    within: Duration,
) -> Result<(std::process::ExitStatus, String)> {
    let t = Instant::now();
    while child.try_wait()?.is_none() {
        if t.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {within:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status, text))
}

/// Checks that `(status, output)` is a failure whose output says `needle`.
fn failed_saying(
    what: &str,
    (st, out): (std::process::ExitStatus, String),
    needle: &str,
) -> Result<()> {
    ensure!(!st.success(), "{what}: exited successfully:\n{out}");
    ensure!(
        out.contains(needle),
        "{what}: exited with {st} without saying `{needle}`:\n{out}"
    );
    Ok(())
}

impl Lab<'_> {
    /// The refusals, against `server` (a normal AF_XDP server), which the last one stops.
    pub(super) fn refusals(&self, s: &mut Stages, server: ServerProc) -> Result<()> {
        let bench = || {
            let mut c = self.client_command(&self.bin.join("bluebridge-bench"));
            c.args(["--quiet", "--warmup", "0"]);
            c
        };
        s.run(
            "bench refuses an unwritable --json before it runs (a 60 s run, refused at once)",
            || {
                let mut c = bench();
                c.args(["--seconds", "60", "--json", "/proc/bluebridge/report.json"]);
                failed_saying(
                    "--json to /proc",
                    finish(c, Duration::from_secs(10))?,
                    "cannot write there",
                )
            },
        )?;
        s.run(
            "bench --echo against a server that is not an echo fails and says so",
            || {
                let mut c = bench();
                c.args(["--echo", "--seconds", "1"]);
                failed_saying(
                    "--echo to a normal server",
                    finish(c, Duration::from_secs(20))?,
                    "--echo",
                )
            },
        )?;
        s.run(
            "a server that dies mid-run ends a 60 s bench run within seconds",
            || {
                let mut c = bench();
                c.args(["--seconds", "60"]);
                let child = c
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting bluebridge-bench")?;
                std::thread::sleep(Duration::from_millis(1500));
                let t = Instant::now();
                server.stop()?;
                let out = wait_output(child, Duration::from_secs(20))?;
                println!(
                    "      the run ended {:.1} s after the server stopped",
                    t.elapsed().as_secs_f64()
                );
                failed_saying("a dead server", out, "run cut short")
            },
        )
    }
}
