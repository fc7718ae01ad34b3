//! Time of the CPU decode attention (`model::attend::decode_step`) over a codegen-350M-shaped
//! cache: ROWS rows of TOKENS, TOKENS + 2, ... cached tokens, 16 heads of 64, 20 layers with a
//! cache each (together larger than L3, so they stream from memory as in a decode step); THREADS
//! threads (2). Prints the median and best of 40 steps and the cache bytes read per second.
//!
//!     cargo run --release --example attend_bench -p zerotune-worker -- [ROWS] [TOKENS] [THREADS]

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use zerotune_worker::model::attend::decode_step;

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<i64>().expect("a number"));
    let (rows, tokens) = (args.next().unwrap_or(8), args.next().unwrap_or(500));
    tch::set_num_threads(args.next().unwrap_or(2) as i32);
    let (heads, dim, layers, capacity) = (16, 64, 20, ((tokens + 2 * rows + 64) as u64).next_power_of_two() as i64);
    let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let mut caches: Vec<(Tensor, Tensor)> =
        (0..layers).map(|_| (randn(&[rows, heads, capacity, dim]), randn(&[rows, heads, capacity, dim]))).collect();
    let (query, key, value) = (randn(&[rows, heads, 1, dim]), randn(&[rows, heads, 1, dim]), randn(&[rows, heads, 1, dim]));
    let mut attended: Vec<i64> = (0..rows).map(|r| tokens + 2 * r + 1).collect();
    let mut times = vec![];
    for _ in 0..40 {
        let start = Instant::now();
        for (keys, values) in &mut caches {
            let _ = decode_step(&query, (&key, &value), (keys, values), &attended, None).expect("fp32 on an AVX2 CPU");
        }
        times.push(start.elapsed().as_secs_f64() * 1e3);
        attended.iter_mut().for_each(|a| *a += 1);
    }
    times.sort_by(f64::total_cmp);
    let bytes = attended.iter().map(|&a| (a - 20) as f64).sum::<f64>() * (2 * heads * dim * 4 * layers) as f64;
    println!(
        "rows {rows} tokens {tokens}: attention of one step (20 layers) median {:.2} ms, min {:.2} ms; {:.1} GB/s at the median",
        times[20],
        times[0],
        bytes / times[20] / 1e6
    );
}
