//! A real one-node Slurm cluster for a test: scripts/slurm_cluster.sh starts munged, slurmctld
//! and slurmd on loopback with their config, state, spool and logs in a temporary directory,
//! and stops them when the [`Cluster`] is dropped (or, if the test process dies first, once it
//! has gone). Commands reach it through [`Cluster::env`] (SLURM_CONF).

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A running cluster; dropping it stops it.
pub struct Cluster {
    dir: TempDir,
    conf: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm_cluster.sh")
}

impl Cluster {
    /// Starts one and waits until its node is idle. Panics with the reason when it cannot (Slurm or
    /// munge not installed, not root, a daemon that did not start): Slurm tests fail, not skip.
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new().prefix("slurm-").tempdir().expect("a temporary directory");
        let run = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .args(["--owner", &std::process::id().to_string()])
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script().display()));
        if !run.status.success() {
            let stderr = String::from_utf8_lossy(&run.stderr);
            let hint = if stderr.contains("missing ") {
                " (install slurmd slurmctld slurm-client munge: scripts/setup.sh --test does, as root)"
            } else {
                ""
            };
            panic!(
                "the test's Slurm cluster did not start{hint}: scripts/slurm_cluster.sh start {}: {}",
                dir.path().display(),
                stderr.trim()
            );
        }
        let conf = dir.path().join("slurm.conf");
        Cluster { dir, conf }
    }

    /// What a Slurm command (salloc, srun, sinfo, ...) needs to use this cluster.
    pub fn env(&self) -> [(&str, PathBuf); 1] {
        [("SLURM_CONF", self.conf.clone())]
    }

    /// Its directory: slurm.conf, the daemons' logs, spool and state.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the controller's and the node daemon's logs, for an assertion's message.
    pub fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!("--- {name}\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Best effort: the script's watcher stops it anyway once this process has gone.
        let _ = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).output();
    }
}
