//! Time of one batched decode step on a saved model (bench/serve.sh explains the numbers): ROWS
//! rows of TOKENS, TOKENS + 2, ... cached tokens (of different lengths, as requests that arrived
//! apart are), on the CPU; median and best of 150 steps.
//!
//!     cargo run --example decode_bench -p zerotune-worker -- MODEL_DIR [ROWS] [TOKENS] [THREADS]

use std::time::Instant;

use tch::{Device, Tensor};
use zerotune_worker::generate::{Loaded, Precision};
use zerotune_worker::model::{BatchCache, KvCache};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("MODEL_DIR"));
    let rows: i64 = args.next().map_or(1, |a| a.parse().unwrap());
    let tokens: i64 = args.next().map_or(500, |a| a.parse().unwrap());
    tch::set_num_threads(args.next().map_or(2, |a| a.parse().unwrap()));
    let loaded = Loaded::open(&dir, Device::Cpu, Precision::Fp32, zerotune_hf::manifest::NonFinite::Refuse).unwrap();
    let _guard = tch::no_grad_guard();
    let mut batch = BatchCache::new(loaded.config.context() as i64);
    for r in 0..rows {
        let mut cache = KvCache::default();
        let ids = Tensor::arange_start(1 + r, tokens + 1 + 2 * r, (tch::Kind::Int64, Device::Cpu)).view([1, -1]);
        let _ = loaded.model.prefill(&ids, &mut cache, false);
        batch.push(&cache);
    }
    let ids = Tensor::ones([rows, 1], (tch::Kind::Int64, Device::Cpu));
    let mut times = vec![];
    for _ in 0..150 {
        let start = Instant::now();
        let _ = loaded.model.decode(&ids, &mut batch);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("rows {rows} tokens {tokens}: decode step median {:.1} ms, min {:.1} ms", times[75], times[0]);
}
