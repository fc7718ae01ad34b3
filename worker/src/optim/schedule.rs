//! Learning-rate schedules as HF `transformers.get_scheduler` defines them: the rate used by the
//! optimizer step that follows `completed` earlier steps is `lr * lambda(completed)`.

use zerotune_proto::plan::{Schedule, ScheduleKind};

/// Learning rate for the step after `completed` optimizer steps (skipped fp16 steps not counted).
pub fn learning_rate(base: f64, schedule: &Schedule, completed: u64) -> f64 {
    base * multiplier(schedule, completed)
}

fn multiplier(s: &Schedule, step: u64) -> f64 {
    let (step, warmup, total) = (step as f64, s.warmup_steps as f64, s.total_steps as f64);
    let in_warmup = step < warmup;
    let warm = step / warmup.max(1.0);
    match s.kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::ConstantWithWarmup => {
            if in_warmup {
                warm
            } else {
                1.0
            }
        }
        ScheduleKind::Linear => {
            if in_warmup {
                warm
            } else {
                ((total - step) / (total - warmup).max(1.0)).max(0.0)
            }
        }
        ScheduleKind::Cosine => {
            if in_warmup {
                warm
            } else {
                let progress = (step - warmup) / (total - warmup).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule { kind, warmup_steps: 2, total_steps: 10 }
    }

    #[test]
    fn linear_warms_up_from_zero_then_decays_to_zero() {
        let lrs: Vec<f64> = (0..11).map(|k| learning_rate(1.0, &sched(ScheduleKind::Linear), k)).collect();
        assert_eq!(&lrs[..4], &[0.0, 0.5, 1.0, 0.875]);
        assert_eq!(lrs[10], 0.0);
    }

    #[test]
    fn cosine_is_half_way_at_the_middle_and_constant_ignores_warmup() {
        let mid = learning_rate(2.0, &sched(ScheduleKind::Cosine), 6);
        assert!((mid - 1.0).abs() < 1e-12);
        assert_eq!(learning_rate(2.0, &sched(ScheduleKind::Constant), 0), 2.0);
        assert_eq!(learning_rate(2.0, &sched(ScheduleKind::ConstantWithWarmup), 1), 1.0);
    }
}
