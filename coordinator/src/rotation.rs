//! Which checkpoints `--save_total_limit` removes, as a pure function: the oldest saves first,
//! by this run's save history (a resume from an older checkpoint saves lower steps after higher
//! ones), checkpoints outside that history (an older run's, or a branch abandoned by a resume)
//! before any in it, and never a protected one (the one just written, the one `latest` names).

/// The steps to remove from `on_disk` so that at most `limit` remain (or as few as the protected
/// ones allow), in removal order. `history` lists this run's saves, oldest first.
pub fn to_remove(on_disk: &[u64], history: &[u64], protected: &[u64], limit: usize) -> Vec<u64> {
    let mut outside: Vec<u64> = on_disk.iter().copied().filter(|step| !history.contains(step)).collect();
    outside.sort_unstable();
    let inside = history.iter().copied().filter(|step| on_disk.contains(step));
    let excess = on_disk.len().saturating_sub(limit);
    outside.into_iter().chain(inside).filter(|step| !protected.contains(step)).take(excess).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_saves_go_first_and_never_the_newest() {
        assert_eq!(to_remove(&[5, 10, 15], &[5, 10, 15], &[15], 2), [5]);
        assert_eq!(to_remove(&[5, 10, 15], &[5, 10, 15], &[15], 5), Vec::<u64>::new());
        assert_eq!(to_remove(&[5, 10, 15], &[5, 10, 15], &[15], 1), [5, 10]);
    }

    #[test]
    fn a_resume_from_an_older_checkpoint_keeps_what_it_saves() {
        // Resumed from 100 with 120 on disk (an abandoned branch), then saved 110: 120 goes first.
        assert_eq!(to_remove(&[100, 110, 120], &[100, 110], &[110], 1), [120, 100]);
        assert_eq!(to_remove(&[100, 110, 120], &[100, 110], &[110], 2), [120]);
    }

    #[test]
    fn an_older_runs_checkpoints_go_before_this_runs() {
        // --overwrite_output_dir over a run that reached checkpoint-500.
        assert_eq!(to_remove(&[2, 4, 500], &[2, 4], &[4], 2), [500]);
        assert_eq!(to_remove(&[2, 4, 500], &[2, 4], &[4], 1), [500, 2]);
    }

    #[test]
    fn protected_checkpoints_stay_even_beyond_the_limit() {
        // `latest` names 4 while 6 was just written (both protected), limit 1.
        assert_eq!(to_remove(&[2, 4, 6], &[2, 4, 6], &[6, 4], 1), [2]);
        // Checkpoints from before the history was recorded: by step.
        assert_eq!(to_remove(&[3, 1, 2], &[], &[3], 1), [1, 2]);
    }
}
