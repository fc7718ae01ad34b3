//! What reaches the job driver while workers run, as plain data: the workers' reports (from the
//! gRPC service), process exits (from the launcher) and the user's requests (signals).

use zerotune_proto::v1::{EvalReport, FailureKind, SavedReport, StepReport};

/// What workers, launchers and the user tell the driver.
#[derive(Debug)]
pub enum Event {
    Registered {
        rank: u32,
        local_rank: u32,
        host: String,
        device: String,
        pid: u32,
    },
    Step(StepReport),
    /// A rank is alive; `step` is the last step it finished.
    Heartbeat {
        rank: u32,
        step: u64,
    },
    Eval(EvalReport),
    Saved(SavedReport),
    /// A rank said why it cannot go on.
    Failed {
        rank: u32,
        kind: FailureKind,
        message: String,
    },
    /// A rank's command stream was dropped (its connection closed).
    Disconnected {
        rank: u32,
    },
    /// A process we started ended (from the launcher, not the network): one rank's, or one that
    /// runs every rank (`rank: None`, as srun does).
    Exited {
        rank: Option<u32>,
        status: ExitStatus,
    },
    /// The user asked for something while the job runs (a signal to the coordinator).
    Control(Control),
}

/// What a user can ask of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Save a checkpoint at the next step every rank can still reach (SIGUSR1).
    Save,
    /// Save a checkpoint there, then stop (the first SIGINT or SIGTERM).
    Stop { signal: Signal },
    /// Stop now, mid-step if need be (the second SIGINT or SIGTERM).
    Abort { signal: Signal },
}

/// A Unix signal, named where a job meets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
    Kill,
    Usr1,
    Other(i32),
}

impl Signal {
    pub fn from_number(number: i32) -> Self {
        match number {
            libc::SIGINT => Self::Int,
            libc::SIGTERM => Self::Term,
            libc::SIGKILL => Self::Kill,
            libc::SIGUSR1 => Self::Usr1,
            n => Self::Other(n),
        }
    }

    pub fn number(self) -> i32 {
        match self {
            Self::Int => libc::SIGINT,
            Self::Term => libc::SIGTERM,
            Self::Kill => libc::SIGKILL,
            Self::Usr1 => libc::SIGUSR1,
            Self::Other(n) => n,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int => f.write_str("SIGINT"),
            Self::Term => f.write_str("SIGTERM"),
            Self::Kill => f.write_str("SIGKILL"),
            Self::Usr1 => f.write_str("SIGUSR1"),
            Self::Other(n) => write!(f, "signal {n}"),
        }
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(Signal),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(Signal::from_number(signal)),
            (None, None) => Self::Code(-1),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit status {code}"),
            Self::Signal(signal) => write!(f, "signal {} ({signal})", signal.number()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_from_real_processes() {
        let _forking = crate::forking();
        let run = |script: &str| ExitStatus::from(std::process::Command::new("sh").args(["-c", script]).status().unwrap());
        assert_eq!(run("exit 0"), ExitStatus::Code(0));
        assert!(run("exit 0").success() && !run("exit 3").success());
        assert_eq!(run("exit 3").to_string(), "exit status 3");
        let killed = run("kill -9 $$");
        assert_eq!(killed, ExitStatus::Signal(Signal::Kill));
        assert_eq!(killed.to_string(), "signal 9 (SIGKILL)");
        assert_eq!(run("kill -HUP $$"), ExitStatus::Signal(Signal::Other(libc::SIGHUP)));
    }
}
