//! What would make a job that does not fit fit: the cheapest change first (offload the optimizer,
//! then ZeRO-2, then gradient checkpointing, then micro-batch 1, each added to the ones before,
//! then more GPUs), every candidate run through the same estimator (`estimate::fits`), and of the
//! first set that fits, only the changes it cannot do without. So what is printed fits.

use std::fmt;

use crate::estimate::{self, gib, Capacity, MemoryJob};

/// One change to a job's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Adam's state and step on the host (ds_config `offload_optimizer`).
    Offload,
    /// Gradients partitioned over the ranks (ds_config `zero_optimization.stage` 2).
    Zero2,
    /// Each block's activations recomputed in the backward pass.
    Checkpointing,
    /// One sequence per micro-step, more accumulation steps for the same batch.
    MicroBatch1,
    /// This many ranks.
    World(u64),
}

/// The settings tried, in this order, before more GPUs: the cheapest first (rules as data).
pub const LADDER: [Change; 4] = [Change::Offload, Change::Zero2, Change::Checkpointing, Change::MicroBatch1];
/// More ranks are tried by doubling the world, at most this many times.
const DOUBLINGS: u32 = 12;

impl Change {
    /// Whether `job` does not have this setting yet.
    fn is_new_to(self, job: &MemoryJob) -> bool {
        match self {
            Self::Offload => !job.offload,
            Self::Zero2 => job.zero_stage < 2,
            Self::Checkpointing => !job.checkpointing,
            Self::MicroBatch1 => job.micro > 1,
            Self::World(world) => world != job.world,
        }
    }

    fn apply(self, job: MemoryJob) -> MemoryJob {
        match self {
            Self::Offload => MemoryJob { offload: true, ..job },
            Self::Zero2 => MemoryJob { zero_stage: 2, ..job },
            Self::Checkpointing => MemoryJob { checkpointing: true, ..job },
            Self::MicroBatch1 => MemoryJob { micro: 1, ..job },
            Self::World(world) => MemoryJob { world, ..job },
        }
    }

    /// In words, with the flag or ds_config key that makes it, for `job` (the one not changed).
    fn words(self, job: &MemoryJob) -> String {
        match self {
            Self::Offload => "offload the optimizer (zero_optimization.offload_optimizer.device \"cpu\" in --deepspeed)".into(),
            Self::Zero2 => "ZeRO stage 2 (zero_optimization.stage 2 in --deepspeed)".into(),
            Self::Checkpointing => "--gradient_checkpointing".into(),
            Self::MicroBatch1 => {
                format!("--per_device_train_batch_size 1 (and {} times --gradient_accumulation_steps to keep the batch)", job.micro)
            }
            Self::World(world) if job.gpu => format!("{world} GPUs (--num_gpus / --num_nodes)"),
            Self::World(world) => format!("{world} ranks (--num_workers / --num_nodes)"),
        }
    }
}

/// `job` with `changes` made.
pub fn with(job: &MemoryJob, changes: &[Change]) -> MemoryJob {
    changes.iter().fold(*job, |job, change| change.apply(job))
}

/// What the planner advises for a job that does not fit.
#[derive(Clone, Debug, PartialEq)]
pub struct Advice {
    /// The job as planned.
    pub job: MemoryJob,
    pub capacity: Capacity,
    /// The changes, cheapest first: together they make the job fit, and none can be left out;
    /// or, when `fits` is false, everything tried.
    pub changes: Vec<Change>,
    pub fits: bool,
}

/// The first of the ladder's changes, each added to the ones before, then of ever more ranks,
/// that makes `job` fit `capacity`, without the changes it fits without.
pub fn advise(job: &MemoryJob, capacity: Capacity) -> Advice {
    let fits = |changes: &[Change]| estimate::fits(&with(job, changes), capacity);
    let found = |changes| Advice { job: *job, capacity, changes: fewest(job, capacity, changes), fits: true };
    let mut changes = vec![];
    for change in LADDER.into_iter().filter(|c| c.is_new_to(job)) {
        changes.push(change);
        if fits(&changes) {
            return found(changes);
        }
    }
    for world in (1..=DOUBLINGS).map(|i| job.world << i) {
        let more: Vec<Change> = changes.iter().copied().chain([Change::World(world)]).collect();
        if fits(&more) {
            return found(more);
        }
    }
    changes.push(Change::World(job.world << DOUBLINGS));
    Advice { job: *job, capacity, changes, fits: false }
}

/// `changes` less each one (the most expensive tried first) that the job fits without.
fn fewest(job: &MemoryJob, capacity: Capacity, mut changes: Vec<Change>) -> Vec<Change> {
    for i in (0..changes.len()).rev() {
        let mut without = changes.clone();
        without.remove(i);
        if estimate::fits(&with(job, &without), capacity) {
            changes = without;
        }
    }
    changes
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (job, device) = (&self.job, if self.job.gpu { "GPU" } else { "rank" });
        let words = |changes: &[Change]| changes.iter().map(|c| c.words(job)).collect::<Vec<_>>().join(", ");
        if !self.fits {
            let (tried, more) = self.changes.split_at(self.changes.len() - 1);
            let more = match more {
                [Change::World(world)] => format!("{} times the {device}s", world / job.world),
                _ => words(more),
            };
            let with = if tried.is_empty() { more } else { format!("{} and {more}", words(tried)) };
            return write!(f, "it does not fit even with {with}: use a smaller model or larger devices");
        }
        let changed = with(job, &self.changes);
        let totals = estimate::totals(&changed, &estimate::terms(&changed));
        let of = |need: u64, cap: Option<u64>| cap.map(|cap| format!("{} of {}", gib(need), gib(cap)));
        let mut checked: Vec<String> =
            of(totals.per_device, self.capacity.device).map(|s| format!("{s} per {device}")).into_iter().collect();
        checked.extend(of(totals.per_host, self.capacity.host).map(|s| format!("{s} per host")));
        let place = if changed.world == job.world {
            format!("on the same {} {device}{}", job.world, if job.world == 1 { "" } else { "s" })
        } else {
            format!("on {} {device}s", changed.world)
        };
        write!(f, "it would fit with: {} {place}: {}", words(&self.changes), checked.join(", "))
    }
}
