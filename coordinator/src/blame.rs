//! Which failure stopped the job. One death breaks every rank's collectives, so the first report
//! is often not the cause: the driver collects the failures of an attempt and blames the most
//! direct one. The verdict depends only on the set of failures, never on their arrival order.

use crate::error::CoordinatorError;

/// What a failure says about its rank, most direct first: the blame order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// The process was killed by a signal.
    Killed,
    /// The rank's own error (it said why), or its heartbeats stopped.
    OwnError,
    /// The process exited with an error status without saying why.
    Exited,
    /// The rank's command stream closed before the run finished: it died or its host is gone.
    Disconnected,
    /// The rank's collective broke because a peer went away.
    PeerLost,
    /// The process that runs every rank (srun) ended: the ranks' own reports say more.
    LauncherExited,
}

impl Cause {
    /// A rank's word about itself: it explains that rank's error exit and its disconnect.
    fn is_report(self) -> bool {
        matches!(self, Self::OwnError | Self::PeerLost)
    }
}

/// One failure: its cause, the rank it concerns (none for srun), and the error to show.
#[derive(Debug)]
pub struct Failure {
    pub cause: Cause,
    pub rank: Option<u32>,
    pub error: CoordinatorError,
}

/// The failures of one attempt.
#[derive(Debug, Default)]
pub struct Blame {
    failures: Vec<Failure>,
}

impl Blame {
    pub fn add(&mut self, cause: Cause, rank: Option<u32>, error: CoordinatorError) {
        self.failures.push(Failure { cause, rank, error });
    }

    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }

    /// The most direct failure. Consequences are set aside first: a rank that said why it failed
    /// then dies (by a signal or an error exit) and disconnects, and a rank whose exit we saw also
    /// disconnects. What is left is ordered by cause, then rank, then message, so the same
    /// failures give the same verdict whatever order they arrived in.
    pub fn verdict(self) -> Option<CoordinatorError> {
        let has = |rank: Option<u32>, pred: &dyn Fn(Cause) -> bool| {
            rank.is_some() && self.failures.iter().any(|f| f.rank == rank && pred(f.cause))
        };
        let explained = |f: &Failure| match f.cause {
            // A rank that said why it stopped is then killed (NCCL aborts), exits and disconnects.
            Cause::Killed | Cause::Exited => has(f.rank, &Cause::is_report),
            Cause::Disconnected => has(f.rank, &|c| c != Cause::Disconnected),
            _ => false,
        };
        let keep: Vec<bool> = self.failures.iter().map(|f| !explained(f)).collect();
        self.failures
            .into_iter()
            .zip(keep)
            .filter_map(|(f, keep)| keep.then_some(f))
            .min_by_key(|f| (f.cause, f.rank.unwrap_or(u32::MAX), f.error.to_string()))
            .map(|f| f.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(cause: Cause, rank: Option<u32>) -> (Cause, Option<u32>) {
        (cause, rank)
    }

    /// The verdict over every order of `failures`, as (rank, message).
    fn verdicts(failures: &[(Cause, Option<u32>)]) -> Vec<String> {
        permutations(failures.len())
            .into_iter()
            .map(|order| {
                let mut blame = Blame::default();
                for i in order {
                    let (cause, rank) = failures[i];
                    let message = format!("{cause:?} {rank:?}");
                    blame.add(cause, rank, CoordinatorError::Worker { rank: rank.unwrap_or(0), host: "test".into(), message });
                }
                let verdict = blame.verdict().unwrap().to_string();
                verdict.split_once("failed: ").map_or(verdict.clone(), |(_, message)| message.to_string())
            })
            .collect()
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut all = vec![];
        for rest in permutations(n - 1) {
            for at in 0..=rest.len() {
                let mut order = rest.clone();
                order.insert(at, n - 1);
                all.push(order);
            }
        }
        all
    }

    fn always(failures: &[(Cause, Option<u32>)], expected: &str) {
        let verdicts = verdicts(failures);
        assert!(verdicts.iter().all(|v| v == expected), "{failures:?}: {verdicts:?}");
    }

    #[test]
    fn the_order_is_typed_most_direct_first() {
        use Cause::*;
        let order = [Killed, OwnError, Exited, Disconnected, PeerLost, LauncherExited];
        assert!(order.windows(2).all(|w| w[0] < w[1]));
    }

    /// Under srun, rank 1 is SIGKILLed: its stream drops; rank 0's ring breaks, so rank 0 reports
    /// a lost peer and then disconnects; srun exits. Rank 1 is blamed in all 24 orders, also when
    /// rank 0's disconnect comes before its report.
    #[test]
    fn a_killed_rank_under_srun_is_blamed_in_every_order() {
        use Cause::*;
        let failures = [failure(Disconnected, Some(1)), failure(Disconnected, Some(0)), failure(PeerLost, Some(0))];
        always(&[&failures[..], &[failure(LauncherExited, None)]].concat(), "Disconnected Some(1)");
        always(&failures, "Disconnected Some(1)");
    }

    /// Over ssh the remote shell turns a SIGKILL into an exit status: the rank that said nothing
    /// is blamed, not the one that reported its lost peer and exited 1.
    #[test]
    fn an_exit_explained_by_its_own_report_is_a_consequence() {
        use Cause::*;
        let failures = [
            failure(Exited, Some(0)),
            failure(PeerLost, Some(0)),
            failure(Disconnected, Some(0)),
            failure(Exited, Some(1)),
            failure(Disconnected, Some(1)),
        ];
        always(&failures, "Exited Some(1)");
    }

    /// NCCL aborts a rank whose collective failed: that rank's signal is its report's consequence.
    #[test]
    fn a_rank_killed_after_its_report_is_represented_by_the_report() {
        use Cause::*;
        let failures = [failure(PeerLost, Some(0)), failure(Killed, Some(0)), failure(Disconnected, Some(1)), failure(Exited, Some(1))];
        always(&failures, "Exited Some(1)");
    }

    #[test]
    fn a_signal_beats_everything_and_ties_go_to_the_lowest_rank() {
        use Cause::*;
        always(&[failure(OwnError, Some(0)), failure(Killed, Some(2)), failure(Disconnected, Some(2))], "Killed Some(2)");
        always(&[failure(OwnError, Some(2)), failure(OwnError, Some(1)), failure(LauncherExited, None)], "OwnError Some(1)");
        // A rank's own error is more direct than the exit and disconnect it causes.
        always(&[failure(Disconnected, Some(0)), failure(OwnError, Some(0)), failure(Exited, Some(0))], "OwnError Some(0)");
        always(&[failure(LauncherExited, None)], "LauncherExited None");
        assert!(Blame::default().verdict().is_none());
    }
}
