//! How far each rank's commands may run ahead of its reports, and where a checkpoint asked for
//! mid-run lands: the same step for every rank.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Steps a rank's commands may run ahead of its reports: the next batches are always there,
/// and a checkpoint asked for mid-run lands within a few steps.
const LOOKAHEAD: u64 = 2;

/// What the command producers share with the driver: how far each rank got, and the
/// checkpoints asked for while the job runs. Every rank's producer emits a requested checkpoint
/// at the same step: the first one no producer has started sending.
#[derive(Default)]
pub(super) struct Pace {
    state: Mutex<PaceState>,
    advanced: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct PaceState {
    /// The last step each rank reported finished.
    finished: Vec<u64>,
    /// The step each rank's producer is sending (or sent last).
    producing: Vec<u64>,
    saves: BTreeSet<u64>,
    stop_at: Option<u64>,
    /// The attempt is over: producers stop waiting.
    closed: bool,
}

impl Pace {
    pub(super) fn new(world: u32, first_step: u64) -> Self {
        let ranks = vec![first_step - 1; world as usize];
        Self { state: Mutex::new(PaceState { finished: ranks.clone(), producing: ranks, ..Default::default() }), ..Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        self.state.lock().expect("pace lock")
    }

    /// Blocks until `rank` may be sent `step`; false once the attempt is over.
    pub(super) fn start(&self, rank: u32, step: u64) -> bool {
        let mut state = self.lock();
        while !state.closed && state.finished[rank as usize] + LOOKAHEAD < step {
            state = self.advanced.wait(state).expect("pace lock");
        }
        state.producing[rank as usize] = step;
        !state.closed
    }

    pub(super) fn finished(&self, rank: u32, step: u64) {
        if let Some(done) = self.lock().finished.get_mut(rank as usize) {
            *done = (*done).max(step);
        }
        self.advanced.notify_all();
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.advanced.notify_all();
    }

    /// Asks for a checkpoint (followed by a stop) at the first step no rank was sent, if that
    /// comes before `last` (whose end saves the final model anyway); returns it.
    pub(super) fn checkpoint(&self, stop: bool, last: u64) -> Option<u64> {
        let mut state = self.lock();
        let at = state.producing.iter().max().map_or(1, |s| s + 1);
        if at >= last {
            return None;
        }
        state.saves.insert(at);
        if stop {
            state.stop_at = Some(state.stop_at.map_or(at, |s| s.min(at)));
        }
        Some(at)
    }

    /// Whether to save after `step`, and whether to stop there.
    pub(super) fn at(&self, step: u64) -> (bool, bool) {
        let state = self.lock();
        (state.saves.contains(&step), state.stop_at == Some(step))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_requested_checkpoint_lands_on_the_first_step_no_rank_was_sent() {
        let pace = Arc::new(Pace::new(2, 5)); // resumed after step 4
        assert!(pace.start(0, 5) && pace.start(0, 6) && pace.start(1, 5));
        assert_eq!(pace.checkpoint(false, 100), Some(7));
        assert_eq!(pace.checkpoint(true, 100), Some(7));
        assert_eq!(pace.checkpoint(true, 7), None, "the last step saves the final model anyway");
        assert_eq!((pace.at(6), pace.at(7)), ((false, false), (true, true)));

        // Rank 0 gets step 7 once it finished step 5 (LOOKAHEAD 2); a closed pace frees waiters.
        let next = std::thread::spawn({
            let pace = pace.clone();
            move || pace.start(0, 7)
        });
        pace.finished(0, 5);
        assert!(next.join().unwrap());
        let waiting = std::thread::spawn({
            let pace = pace.clone();
            move || pace.start(1, 9)
        });
        pace.close();
        assert!(!waiting.join().unwrap(), "after the attempt, producers stop");
        assert_eq!(pace.checkpoint(false, 100), Some(10), "requests count every step already handed out");
    }
}
