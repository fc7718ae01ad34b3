//! The ordered commands for one rank (train steps with their micro-batches, evaluations, saves,
//! stop, finish), produced from the token cache as the pace allows.

use std::path::PathBuf;

use tokio::sync::mpsc;
use tonic::Status;
use zerotune_proto::v1::{command, Batch, Command, Evaluate, Finish, Save, Stop, TrainStep};

use super::pace::Pace;
use crate::checkpoint::partial_dir;
use crate::dataset::TokenCache;
use crate::sampler::Sampler;

/// When to evaluate and save, as plain numbers.
#[derive(Clone, Debug)]
pub(super) struct Cadence {
    pub(super) total_steps: u64,
    pub(super) eval_steps: Option<u64>,
    pub(super) do_eval: bool,
    pub(super) save_steps: Option<u64>,
    pub(super) eval_batch: usize,
    pub(super) output_dir: PathBuf,
}

impl Cadence {
    /// Whether an evaluation follows `step`: one every `eval_steps` (the last step's comes after
    /// the finish instead).
    pub(super) fn evaluates_after(&self, step: u64) -> bool {
        self.do_eval && self.eval_steps.is_some_and(|n| step % n == 0) && step != self.total_steps
    }

    /// Whether a save follows `step` (after its evaluation): one every `save_steps`, or one the
    /// user `requested` (by signal) that lands on this step.
    pub(super) fn saves_after(&self, step: u64, requested: bool) -> bool {
        requested || self.save_steps.is_some_and(|n| step % n == 0)
    }
}

/// The ordered commands for one rank; stops early if the rank's stream is gone.
#[allow(clippy::too_many_arguments)]
pub(super) fn produce_commands(
    sampler: &Sampler,
    cache: &TokenCache,
    cadence: &Cadence,
    pace: &Pace,
    rank: u32,
    world: u32,
    first_step: u64,
    tx: mpsc::Sender<std::result::Result<Command, Status>>,
) {
    let send = |kind: command::Kind| tx.blocking_send(Ok(Command { kind: Some(kind) })).is_ok();
    let batch = |blocks: &[usize], read: &dyn Fn(usize) -> Vec<u32>| Batch {
        rows: blocks.len() as u32,
        cols: cache.block_size as u32,
        tokens: blocks.iter().flat_map(|&b| read(b)).collect(),
    };
    let eval_blocks: Vec<usize> = (rank as usize..cache.validation_blocks).step_by(world as usize).collect();
    let evaluate = |step: u64| {
        let batches = eval_blocks.chunks(cadence.eval_batch).map(|c| batch(c, &|b| cache.validation_block(b))).collect();
        command::Kind::Evaluate(Evaluate { step, batches })
    };
    for step in first_step..=cadence.total_steps {
        if !pace.start(rank, step) {
            return;
        }
        let micro_batches = sampler.step_batches(step - 1, rank as usize).iter().map(|m| batch(m, &|b| cache.train_block(b))).collect();
        if !send(command::Kind::Step(TrainStep { step, micro_batches })) {
            return;
        }
        if cadence.evaluates_after(step) && !send(evaluate(step)) {
            return;
        }
        let (requested, stop) = pace.at(step);
        if cadence.saves_after(step, requested) {
            let dir = partial_dir(&cadence.output_dir, step).to_string_lossy().into_owned();
            if !send(command::Kind::Save(Save { step, dir })) {
                return;
            }
        }
        if stop {
            send(command::Kind::Stop(Stop { step }));
            return;
        }
    }
    if cadence.do_eval && !send(evaluate(cadence.total_steps)) {
        return;
    }
    let dir = cadence.output_dir.to_string_lossy().into_owned();
    send(command::Kind::Finish(Finish { step: cadence.total_steps, dir }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cadence(eval_steps: Option<u64>, do_eval: bool, save_steps: Option<u64>) -> Cadence {
        Cadence { total_steps: 10, eval_steps, do_eval, save_steps, eval_batch: 1, output_dir: "out".into() }
    }

    fn steps_where(pick: impl Fn(u64) -> bool) -> Vec<u64> {
        (1..=10).filter(|&s| pick(s)).collect()
    }

    #[test]
    fn evaluations_follow_their_steps_and_the_last_step_evaluates_once() {
        let c = cadence(Some(4), true, None);
        assert_eq!(steps_where(|s| c.evaluates_after(s)), [4, 8]);
        let c = cadence(Some(5), true, None);
        assert_eq!(steps_where(|s| c.evaluates_after(s)), [5], "step 10 is the run's end: its evaluation follows the finish");
        let c = cadence(Some(4), false, None);
        assert_eq!(steps_where(|s| c.evaluates_after(s)), Vec::<u64>::new(), "no --do_eval");
        let c = cadence(None, true, None);
        assert_eq!(steps_where(|s| c.evaluates_after(s)), Vec::<u64>::new(), "no --eval_steps");
    }

    #[test]
    fn saves_follow_save_steps_and_requests() {
        let c = cadence(None, false, Some(3));
        assert_eq!(steps_where(|s| c.saves_after(s, false)), [3, 6, 9]);
        assert_eq!(steps_where(|s| c.saves_after(s, s == 7)), [3, 6, 7, 9]);
        let c = cadence(None, false, None);
        assert_eq!(steps_where(|s| c.saves_after(s, false)), Vec::<u64>::new(), "--save_steps 0");
    }
}
