//! Throughput of the decode kernel (`model::matvec`) on codegen-350M's weight shapes, 1 and 8
//! rows, THREADS threads (2): GFLOP/s and weight GB/s per shape, median of 30 calls. Calls rotate
//! over copies of the weights larger than the L3 cache together, so they stream from memory as a
//! decode step's do ("in cache" keeps one small copy: the kernel's arithmetic alone).
//!
//!     cargo run --release --example matvec_bench -p zerotune-worker -- [THREADS]

use std::time::Instant;

use zerotune_worker::model::matvec::rows_times_wt;

fn main() {
    tch::set_num_threads(std::env::args().nth(1).map_or(2, |a| a.parse().unwrap()));
    let shapes = [
        ("qkv_proj", 3072, 1024),
        ("out_proj", 1024, 1024),
        ("fc_in", 4096, 1024),
        ("fc_out", 1024, 4096),
        ("lm_head", 51200, 1024),
        ("in cache", 24, 1024),
    ];
    println!("| shape | out x in | rows | ms | GFLOP/s | weight GB/s |\n|---|---|---|---|---|---|");
    for (name, out, k) in shapes {
        let copies = if name == "in cache" { 1 } else { (256 << 20) / (out * k * 4) + 1 };
        let ws: Vec<Vec<f32>> = (0..copies).map(|c| (0..out * k).map(|i| ((i + c) % 7) as f32 * 0.01).collect()).collect();
        for rows in [1, 4, 8] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut y = vec![0f32; rows * out];
            let calls = if copies == 1 { 20_000 } else { 60 };
            let mut times: Vec<f64> = (0..calls)
                .map(|call| {
                    let w = &ws[call % copies];
                    let t = Instant::now();
                    rows_times_wt(&x, rows, w, k, &mut y);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let s = times[calls / 2];
            let flops = 2.0 * (out * k * rows) as f64;
            println!("| {name} | {out} x {k} | {rows} | {:.3} | {:.0} | {:.1} |", s * 1e3, flops / s / 1e9, (out * k * 4) as f64 / s / 1e9);
        }
    }
}
