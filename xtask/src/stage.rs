//! Stage bookkeeping: one line when a stage starts, one when it ends, with its duration.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub(crate) struct Stages {
    n: usize,
    start: Instant,
}

impl Stages {
    pub(crate) fn new() -> Self {
        Stages {
            n: 0,
            start: Instant::now(),
        }
    }

    pub(crate) fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.n += 1;
        println!("==> [{}] {name}", self.n);
        let t = Instant::now();
        match f() {
            Ok(()) => {
                println!(
                    "<== [{}] {name}: ok ({:.1} s)",
                    self.n,
                    t.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Err(e) => {
                println!(
                    "<== [{}] {name}: FAILED ({:.1} s)",
                    self.n,
                    t.elapsed().as_secs_f64()
                );
                Err(e.context(format!("stage `{name}`")))
            }
        }
    }

    pub(crate) fn finish(&self) {
        println!(
            "==> all {} stages passed in {:.1} s",
            self.n,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Runs a command with inherited output; an unsuccessful exit is an error naming it.
pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} exited with {st}");
    }
    Ok(())
}
