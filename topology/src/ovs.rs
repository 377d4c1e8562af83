//! An Open vSwitch of its own in a namespace: `ovsdb-server` and `ovs-vswitchd` with a private
//! run directory (their sockets, database and logs there, nothing in the system's default), and
//! one bridge on the userspace (`netdev`) datapath, so no kernel module is needed. The bridge's
//! tap device appears in the namespace the daemons run in. Stopped, and the directory removed,
//! on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::TopologyError;
use crate::daemon::{Daemon, wait_for};

/// The OVS schema Debian's openvswitch-common installs.
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// A running Open vSwitch with one bridge.
#[derive(Debug)]
pub struct OvsSwitch {
    /// The bridge.
    pub bridge: String,
    /// The run directory (`db.sock`, `<bridge>.mgmt`, logs).
    pub rundir: PathBuf,
    // vswitchd first, then the database.
    daemons: Vec<Daemon>,
}

impl OvsSwitch {
    /// Starts the daemons in namespace `ns` with run directory `rundir` (created; daemons an
    /// earlier run left there are killed) and adds `bridge` with `datapath_type=netdev` and
    /// `fail-mode=secure` (no flows: nothing forwards until a controller installs some).
    pub fn start(ns: &str, bridge: &str, rundir: &Path) -> Result<OvsSwitch, TopologyError> {
        let failed = |what: &str, e: String| TopologyError::Command {
            cmd: what.to_owned(),
            stderr: e,
        };
        if !Path::new(SCHEMA).exists() {
            return Err(failed(
                "Open vSwitch",
                format!("{SCHEMA} missing: install openvswitch-switch"),
            ));
        }
        crate::daemon::kill_stale(rundir);
        let _ = std::fs::remove_dir_all(rundir);
        std::fs::create_dir_all(rundir)
            .map_err(|e| failed("creating the OVS run directory", e.to_string()))?;
        let db = rundir.join("conf.db");
        crate::run(
            Command::new("ovsdb-tool")
                .arg("create")
                .arg(&db)
                .arg(SCHEMA),
        )?;
        let env = [
            ("OVS_RUNDIR", rundir),
            ("OVS_LOGDIR", rundir),
            ("OVS_DBDIR", rundir),
        ];
        let sock = rundir.join("db.sock");
        let mut sw = OvsSwitch {
            bridge: bridge.to_owned(),
            rundir: rundir.to_owned(),
            daemons: Vec::new(),
        };
        let arg = |k: &str, f: &str| format!("{k}={}", rundir.join(f).display());
        let ovsdb = Daemon::spawn(
            ns,
            "ovsdb-server",
            &[
                &db.display().to_string(),
                &format!("--remote=punix:{}", sock.display()),
                &arg("--unixctl", "ovsdb-server.ctl"),
                &arg("--pidfile", "ovsdb-server.pid"),
            ],
            &env,
            &rundir.join("ovsdb-server.log"),
        )?;
        sw.daemons.push(ovsdb);
        wait_for(
            "ovsdb-server",
            Duration::from_secs(10),
            &mut sw.daemons,
            || sock.exists(),
        )?;
        sw.vsctl(&["--no-wait", "init"])?;
        let vswitchd = Daemon::spawn(
            ns,
            "ovs-vswitchd",
            &[
                &format!("unix:{}", sock.display()),
                &arg("--unixctl", "ovs-vswitchd.ctl"),
                &arg("--pidfile", "ovs-vswitchd.pid"),
            ],
            &env,
            &rundir.join("ovs-vswitchd.log"),
        )?;
        sw.daemons.insert(0, vswitchd);
        let ctl = rundir.join("ovs-vswitchd.ctl");
        wait_for(
            "ovs-vswitchd",
            Duration::from_secs(10),
            &mut sw.daemons,
            || ctl.exists(),
        )?;
        sw.vsctl(&[
            "add-br",
            bridge,
            "--",
            "set",
            "bridge",
            bridge,
            "datapath_type=netdev",
            "fail-mode=secure",
        ])?;
        let mgmt = rundir.join(format!("{bridge}.mgmt"));
        wait_for(
            "the bridge's OpenFlow socket",
            Duration::from_secs(10),
            &mut sw.daemons,
            || mgmt.exists(),
        )?;
        Ok(sw)
    }

    /// `ovs-vsctl --db=unix:<rundir>/db.sock ARGS`.
    pub fn vsctl(&self, args: &[&str]) -> Result<String, TopologyError> {
        crate::run(
            Command::new("ovs-vsctl")
                .arg(format!(
                    "--db=unix:{}",
                    self.rundir.join("db.sock").display()
                ))
                .args(args),
        )
    }

    /// Returns once the datapath's cached flows have been checked against the OpenFlow tables
    /// as they are now (a committed flow change reaches the cache only at a revalidator round:
    /// milliseconds after the change, at most `other_config:max-revalidator`, 500 ms by
    /// default). `ovs-appctl -t <rundir>/ovs-vswitchd.ctl revalidator/wait`, twice: it answers
    /// when a round *ends*, and the first round to end may have begun before the call.
    pub fn revalidator_wait(&self) -> Result<(), TopologyError> {
        for _ in 0..2 {
            crate::run(
                Command::new("ovs-appctl")
                    .arg("--timeout=10")
                    .arg("-t")
                    .arg(self.rundir.join("ovs-vswitchd.ctl"))
                    .arg("revalidator/wait"),
            )?;
        }
        Ok(())
    }

    /// Fails if a daemon has exited.
    pub fn check(&mut self) -> Result<(), TopologyError> {
        self.daemons.iter_mut().try_for_each(Daemon::check)
    }
}

impl Drop for OvsSwitch {
    fn drop(&mut self) {
        self.daemons.clear();
        let _ = std::fs::remove_dir_all(&self.rundir);
    }
}
