//! The TCP ring's collectives against a direct computation: 2 and 3 ranks (threads with real
//! loopback sockets), odd sizes, every op; strangers without the secret are refused.

use std::net::TcpListener;
use std::time::Duration;

use tch::{Device, Kind, Tensor};
use zerotune_worker::comm::ring::TcpRing;
use zerotune_worker::comm::Collective;

const SECRET: &str = "test-secret";

/// Runs `body(ring)` on `world` ranks at once and returns each rank's result.
fn on_ranks<T: Send>(world: usize, body: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, body) = (peers.clone(), &body);
                scope.spawn(move || {
                    let mut ring = TcpRing::connect(listener, rank, peers, SECRET, Duration::from_secs(10)).unwrap();
                    body(&mut ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank r's input: a distinct, non-integer pattern so sums are checked value by value.
fn input(rank: usize, n: usize, kind: Kind) -> Tensor {
    (Tensor::arange(n as i64, (Kind::Double, Device::Cpu)) * 0.37 + rank as f64 * 1.5 + 0.1).sin().to_kind(kind)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
}

#[test]
fn all_reduce_matches_the_direct_sum() {
    for world in [2, 3] {
        for n in [1, 2, 7, 1001] {
            for kind in [Kind::Float, Kind::Double] {
                let results = on_ranks(world, |ring| {
                    let mut t = input(ring.rank(), n, kind);
                    ring.all_reduce(&mut t).unwrap();
                    values(&t)
                });
                let expected: Vec<f64> = (0..n).map(|i| (0..world).map(|r| values(&input(r, n, kind))[i]).sum()).collect();
                for got in &results {
                    assert_eq!(got, &results[0], "every rank holds the same sum");
                    for (a, b) in got.iter().zip(&expected) {
                        assert!((a - b).abs() < 1e-5, "world {world} n {n} {kind:?}: {a} vs {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_summed_block() {
    for world in [2, 3] {
        for per_rank in [1, 5, 333] {
            let n = per_rank * world;
            let results = on_ranks(world, |ring| {
                let mut out = Tensor::zeros([per_rank as i64], (Kind::Float, Device::Cpu));
                ring.reduce_scatter(&input(ring.rank(), n, Kind::Float), &mut out).unwrap();
                values(&out)
            });
            for (rank, got) in results.iter().enumerate() {
                for (i, a) in got.iter().enumerate() {
                    let b: f64 = (0..world).map(|r| values(&input(r, n, Kind::Float))[rank * per_rank + i]).sum();
                    assert!((a - b).abs() < 1e-5, "world {world} rank {rank}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn all_gather_and_broadcast_copy_exactly() {
    for world in [2, 3] {
        let per_rank = 17;
        let n = per_rank * world;
        // bf16: any dtype travels as bytes.
        let gathered = on_ranks(world, |ring| {
            let mut buffer = Tensor::zeros([n as i64], (Kind::BFloat16, Device::Cpu));
            let mine = input(ring.rank(), n, Kind::BFloat16).narrow(0, (ring.rank() * per_rank) as i64, per_rank as i64);
            buffer.narrow(0, (ring.rank() * per_rank) as i64, per_rank as i64).copy_(&mine);
            ring.all_gather(&mut buffer).unwrap();
            values(&buffer)
        });
        let expected: Vec<f64> =
            (0..world).flat_map(|r| values(&input(r, n, Kind::BFloat16))[r * per_rank..(r + 1) * per_rank].to_vec()).collect();
        assert!(gathered.iter().all(|g| g == &expected), "world {world}: all_gather");

        for root in 0..world {
            let got = on_ranks(world, |ring| {
                let mut t = input(ring.rank(), 9, Kind::Float);
                ring.broadcast(&mut t, root).unwrap();
                ring.barrier().unwrap();
                values(&t)
            });
            assert!(got.iter().all(|g| g == &values(&input(root, 9, Kind::Float))), "world {world} root {root}: broadcast");
        }
    }
}

#[test]
fn a_peer_without_the_secret_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![listener.local_addr().unwrap().to_string(), other.local_addr().unwrap().to_string()];
    let impostor_peers = peers.clone();
    let impostor = std::thread::spawn(move || TcpRing::connect(other, 1, impostor_peers, "wrong", Duration::from_secs(2)));
    let err = TcpRing::connect(listener, 0, peers, SECRET, Duration::from_secs(2)).err().expect("refused");
    assert!(err.to_string().contains("no connection from rank 1"), "{err}");
    let _ = impostor.join();
}

#[test]
fn a_dead_peer_fails_the_collective_instead_of_hanging() {
    let results = on_ranks(2, |ring| {
        if ring.rank() == 1 {
            return None; // leaves: its sockets close when the ring is dropped
        }
        let mut t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
        Some(ring.all_reduce(&mut t).expect_err("the peer is gone").to_string())
    });
    let message = results[0].as_ref().unwrap();
    assert!(message.contains("rank 1"), "{message}");
}
