//! Test hooks, each off unless its environment variable is set: the fault injection of the
//! fault-handling tests (`ZEROTUNE_FAULT`, training) and the engine hold of the serving tests
//! (`ZEROTUNE_TEST_HOLD`). Nothing else in the worker reads these variables.

use std::path::PathBuf;

/// `ZEROTUNE_FAULT=RANK:STEP:MARKER[:stop|:hang]` makes that rank SIGKILL itself (`stop`: SIGSTOP,
/// frozen whole; `hang`: its work blocks forever while its heartbeat goes on) when it starts that
/// step, once (the marker file records that it happened).
pub fn fault(rank: u32, step: u64) {
    let Ok(spec) = std::env::var("ZEROTUNE_FAULT") else { return };
    let mut parts = spec.splitn(3, ':');
    let (Some(r), Some(s), Some(rest)) = (parts.next(), parts.next(), parts.next()) else { return };
    let (marker, fault) = match rest.rsplit_once(':') {
        Some((marker, fault @ ("stop" | "hang"))) => (marker, fault),
        _ => (rest, "kill"),
    };
    if r.parse() != Ok(rank) || s.parse() != Ok(step) || std::fs::File::create_new(marker).is_err() {
        return;
    }
    match fault {
        "hang" => loop {
            std::thread::park();
        },
        // SAFETY: sends a signal to this very process.
        "stop" => unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) },
        _ => unsafe { libc::kill(libc::getpid(), libc::SIGKILL) },
    };
}

/// `ZEROTUNE_TEST_HOLD=PATH`: while PATH exists, the serving engine takes no step; it still
/// admits requests while the batch has room and notices departed clients. Tests use it to keep
/// requests in the batch while they fill it or the queue, disconnect or signal.
pub struct Hold(Option<PathBuf>);

impl Hold {
    pub fn from_env() -> Self {
        Self(std::env::var_os("ZEROTUNE_TEST_HOLD").map(PathBuf::from))
    }

    /// Whether the engine must wait; then it pauses a moment (always false when the hook is off).
    pub fn holding(&self) -> bool {
        let held = self.0.as_ref().is_some_and(|path| path.exists());
        if held {
            std::thread::sleep(std::time::Duration::from_millis(2)); // polling a file the test removes
        }
        held
    }
}
