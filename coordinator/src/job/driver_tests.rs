//! The driver's decisions on scripted events, on tokio's paused clock: no server, no process.

use super::*;
use std::path::Path;

/// Drives a 2-rank job of 4 steps, with `processes` watched processes, through `events`
/// (each sent after its delay in seconds, on tokio's clock).
async fn drive(dir: &Path, processes: u32, events: Vec<(u64, Event)>) -> (Result<()>, u32) {
    drive_under(Launcher::Local, dir, processes, events).await
}

async fn drive_under(launcher: Launcher, dir: &Path, processes: u32, events: Vec<(u64, Event)>) -> (Result<()>, u32) {
    let mut plan = super::super::test_plan(dir, &["--num_workers", "2"]);
    plan.launch.launcher = launcher;
    let spec = JobSpec {
        world: 2,
        output_dir: dir.to_path_buf(),
        tokenizer_files: &[],
        plan: &plan,
        total_steps: 4,
        sampler: Sampler { blocks: 100, world: 2, micro_batch: 1, accumulation: 1, seed: 0 },
        processes,
        pace: Arc::new(Pace::new(2, 1)),
        checkpoints: vec![],
        data: &DataIdentity {
            documents_hash: "0".into(),
            train_documents: 1,
            validation_documents: 0,
            train_blocks: 100,
            validation_blocks: 0,
        },
        block_size: 8,
    };
    let mut job = RunningJob::new(spec);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let (_controls_tx, mut controls) = mpsc::unbounded_channel();
    let sender = tokio::spawn(async move {
        for (delay, event) in events {
            tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
            let _ = events_tx.send(event);
        }
    });
    let mut progress = Progress::new(dir, 4, 50, 1, false).unwrap();
    let result = job.drive(&mut events_rx, &mut controls, &mut progress).await;
    sender.abort();
    (result, job.finished)
}

fn registered(rank: u32) -> Event {
    Event::Registered { rank, local_rank: 0, host: format!("node-{rank}"), device: "cpu".into(), pid: 1 }
}

/// With ZeRO stage 0, rank 1 has nothing to write for the final model: it acknowledges at once
/// and exits while rank 0 still saves. That is a finished rank, not a failed one.
#[tokio::test]
async fn a_rank_may_exit_once_its_final_save_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let saved = |rank| Event::Saved(SavedReport { rank, step: 4, dir: out.clone(), kind: SaveKind::FinalModel.into() });
    let exited = |rank| Event::Exited { rank: Some(rank), status: ExitStatus::Code(0) };
    let events = [saved(1), exited(1), Event::Disconnected { rank: 1 }, saved(0), exited(0)];
    let (result, finished) = drive(dir.path(), 2, events.into_iter().map(|e| (0, e)).collect()).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(finished, 2);
}

/// The Slurm case of the flaky launch test: rank 1 is SIGKILLed under srun. Its stream drops;
/// rank 0's ring breaks, it reports the lost peer and disconnects; srun exits 137. Whatever
/// the order, and however late rank 1's disconnect comes within the grace period, rank 1 is
/// blamed.
#[tokio::test(start_paused = true)]
async fn the_killed_rank_is_blamed_in_every_order_and_with_delays() {
    let dir = tempfile::tempdir().unwrap();
    let failures = || {
        [
            Event::Disconnected { rank: 1 },
            Event::Disconnected { rank: 0 },
            Event::Failed { rank: 0, kind: FailureKind::PeerLost, message: "collective failed: lost rank 1".into() },
            Event::Exited { rank: None, status: ExitStatus::Code(137) },
        ]
    };
    let mut orders = vec![vec![]];
    for n in 0..4 {
        orders = orders.into_iter().flat_map(|o: Vec<usize>| (0..=o.len()).map(move |at| [&o[..at], &[n], &o[at..]].concat())).collect();
    }
    assert_eq!(orders.len(), 24);
    for (i, order) in orders.into_iter().enumerate() {
        let mut slots: Vec<Option<Event>> = failures().into_iter().map(Some).collect();
        // Delays of 0 to 3 s between the reports (at most 9 s in all); in every sixth order the
        // last one comes 9 s after the others (the grace period is 10 s).
        let mut events = vec![(0, registered(0)), (0, registered(1))];
        for (k, &at) in order.iter().enumerate() {
            let delay = match (k, i % 6) {
                (0, _) => 0,
                (3, 0) => 9,
                (_, 0) => 0,
                _ => ((i + k) % 4) as u64,
            };
            events.push((delay, slots[at].take().unwrap()));
        }
        let (result, _) = drive(dir.path(), 1, events).await;
        let err = result.unwrap_err().to_string();
        assert!(err.starts_with("worker rank 1 (node-1) failed: its connection"), "order {order:?}: {err}");
    }
}

/// Under srun a SIGKILLed task's connection closes at once, the survivor reports the lost
/// peer, and srun itself lives on (the other task ignores SIGTERM until Slurm's KillWait):
/// the attempt ends DISCONNECT_GRACE after the last connection closed, not after FAILURE_GRACE.
#[tokio::test(start_paused = true)]
async fn under_srun_a_killed_task_ends_the_attempt_without_waiting_for_srun() {
    let dir = tempfile::tempdir().unwrap();
    let lost = Event::Failed { rank: 0, kind: FailureKind::PeerLost, message: "collective failed: lost rank 1".into() };
    let events = vec![
        (0, registered(0)),
        (0, registered(1)),
        (0, Event::Disconnected { rank: 1 }),
        (0, lost),
        (0, Event::Disconnected { rank: 0 }),
        (60, Event::Exited { rank: None, status: ExitStatus::Code(137) }),
    ];
    let started = Instant::now();
    let (result, _) = drive_under(Launcher::Slurm { world_from: "SLURM_NTASKS=2".into() }, dir.path(), 1, events).await;
    let err = result.unwrap_err().to_string();
    assert!(err.starts_with("worker rank 1 (node-1) failed: its connection"), "{err}");
    assert_eq!(started.elapsed(), DISCONNECT_GRACE, "on tokio's paused clock");
    // With one process per rank (ssh, local) the process's exit is still what ends a rank.
    let late = Event::Exited { rank: Some(0), status: ExitStatus::Code(1) };
    let events = vec![(0, registered(0)), (0, registered(1)), (0, Event::Disconnected { rank: 1 }), (60, late)];
    let started = Instant::now();
    let (result, _) = drive(dir.path(), 2, events).await;
    assert!(result.is_err());
    assert_eq!(started.elapsed(), FAILURE_GRACE, "on tokio's paused clock");
}
