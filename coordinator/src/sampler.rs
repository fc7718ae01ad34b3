//! Which blocks each rank trains on: a per-epoch seeded permutation of block ids, rank r taking
//! every world-th id (torch `DistributedSampler`), grouped into micro-batches and optimizer steps.
//! A position (epoch, step within it) fully determines what comes next, so resume is exact.

/// Fisher-Yates shuffle with a seeded generator.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    zerotune_data::rng::shuffle(items, &mut zerotune_data::rng::SplitMix64::new(seed));
}

/// The batch arithmetic of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    pub blocks: usize,
    pub world: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub seed: u64,
}

impl Sampler {
    /// Optimizer steps in one pass over the data (ragged micro-batches and steps dropped).
    pub fn steps_per_epoch(&self) -> usize {
        let per_rank = self.blocks / self.world;
        per_rank / self.micro_batch / self.accumulation
    }

    /// Block ids rank `rank` sees in `epoch`, in order.
    pub fn rank_order(&self, epoch: u64, rank: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.blocks).collect();
        shuffle(&mut order, self.seed.wrapping_add(epoch));
        order.into_iter().skip(rank).step_by(self.world).collect()
    }

    /// The micro-batches (block ids) of global step `step` (0-based) for `rank`.
    pub fn step_batches(&self, step: u64, rank: usize) -> Vec<Vec<usize>> {
        let per_epoch = self.steps_per_epoch() as u64;
        let (epoch, within) = (step / per_epoch, (step % per_epoch) as usize);
        let order = self.rank_order(epoch, rank);
        let per_step = self.micro_batch * self.accumulation;
        order[within * per_step..(within + 1) * per_step].chunks(self.micro_batch).map(<[usize]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_partition_each_epoch_and_epochs_differ() {
        let s = Sampler { blocks: 103, world: 3, micro_batch: 2, accumulation: 4, seed: 5 };
        let mut seen: Vec<usize> = (0..3).flat_map(|r| s.rank_order(0, r)).collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        assert_ne!(s.rank_order(0, 0), s.rank_order(1, 0));
        assert_eq!(s.steps_per_epoch(), 34 / 2 / 4);
        let batches = s.step_batches(4, 1);
        assert_eq!(batches.len(), 4);
        assert_eq!(batches[0], s.rank_order(1, 1)[0..2].to_vec(), "step 4 is the first of epoch 1");
    }
}
