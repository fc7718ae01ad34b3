//! CPU AdamW step throughput (bench/adamw.sh): our host kernel on N fp32 parameters, and this
//! machine's memory-bandwidth floor for it (AdamW reads p, m, v, g and writes p, m, v: 28 bytes
//! per parameter), measured twice: a threaded triad over arrays of the same size, and the same
//! loads and stores as AdamW with an add in place of its arithmetic. Also the whole offloaded
//! step as bf16 training runs it: bf16 gradients widened, unscaled and clipped, AdamW, and the
//! bf16 down-cast, in one pass.
//!
//!     cargo run --example adamw_bench -p zerotune-worker -- [N] [STEPS]

use std::time::Instant;

use zerotune_proto::plan::AdamW;
use zerotune_worker::optim::adamw::{AdamState, Cast, Grads, Segment};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("N and STEPS are integers"));
    let n = args.next().unwrap_or(100_000_000);
    let steps = args.next().unwrap_or(10);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());

    let hyper = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let grad: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-4).collect();
    let mut state = AdamState::new(vec![0.5; n]);
    let all = [Segment { start: 0, end: n, decay: true }];
    state.step(&grad, 1.0, hyper.lr, &hyper, &all); // warm-up: pages touched
    let start = Instant::now();
    for _ in 0..steps {
        state.step(&grad, 0.5, hyper.lr, &hyper, &all);
    }
    let ours = n as f64 * steps as f64 / start.elapsed().as_secs_f64();

    // The whole offloaded step as bf16 training runs it: bf16 gradients in, unscale/clip, AdamW,
    // bf16 weights out, one pass.
    let grad_bf16: Vec<u16> = grad.iter().map(|&g| half::bf16::from_f32(g).to_bits()).collect();
    let mut bf16_out = vec![0u16; n];
    state.step_and_cast(Grads::Bf16(&grad_bf16), 0.5, hyper.lr, &hyper, &all, (&mut bf16_out, Cast::Bf16)); // warm-up: pages touched
    let start = Instant::now();
    for _ in 0..steps {
        state.step_and_cast(Grads::Bf16(&grad_bf16), 0.5, hyper.lr, &hyper, &all, (&mut bf16_out, Cast::Bf16));
    }
    let ours_offload = n as f64 * steps as f64 / start.elapsed().as_secs_f64();
    assert!(bf16_out[n / 2] != 0, "the step wrote its bf16 weights");
    drop((bf16_out, grad_bf16));

    // Triad a = b + s * c over n-element arrays, threaded like the kernel: 16 bytes per element
    // moved (b and c read, a read for ownership and written back).
    let (mut a, b, c) = (vec![0f32; n], vec![1f32; n], vec![2f32; n]);
    let chunk = n.div_ceil(threads);
    let triad = |a: &mut [f32]| {
        std::thread::scope(|s| {
            for ((a, b), c) in a.chunks_mut(chunk).zip(b.chunks(chunk)).zip(c.chunks(chunk)) {
                s.spawn(move || a.iter_mut().zip(b).zip(c).for_each(|((a, b), c)| *a = b + 0.5 * c));
            }
        })
    };
    triad(&mut a);
    let start = Instant::now();
    for _ in 0..steps {
        triad(&mut a);
    }
    let bandwidth = 16.0 * n as f64 * steps as f64 / start.elapsed().as_secs_f64();
    assert!(a[n / 2] == 2.0, "the triad ran");
    drop((a, b, c));

    // AdamW's own access pattern with no arithmetic to speak of: read p, m, v, g; write p, m, v.
    let (p, m, v) = (&mut state.master, &mut state.exp_avg, &mut state.exp_avg_sq);
    let pattern = |p: &mut [f32], m: &mut [f32], v: &mut [f32]| {
        std::thread::scope(|s| {
            for (((p, m), v), g) in p.chunks_mut(chunk).zip(m.chunks_mut(chunk)).zip(v.chunks_mut(chunk)).zip(grad.chunks(chunk)) {
                s.spawn(move || {
                    for i in 0..p.len() {
                        p[i] += g[i];
                        m[i] += g[i];
                        v[i] += g[i];
                    }
                });
            }
        })
    };
    pattern(p, m, v);
    let start = Instant::now();
    for _ in 0..steps {
        pattern(p, m, v);
    }
    let pattern_rate = n as f64 * steps as f64 / start.elapsed().as_secs_f64();
    println!(
        "RESULT {{\"params\": {n}, \"threads\": {threads}, \"zerotune_params_per_s\": {ours:.0}, \"zerotune_offload_params_per_s\": {ours_offload:.0}, \"bandwidth_bytes_per_s\": {bandwidth:.0}, \"floor_params_per_s\": {:.0}, \"pattern_params_per_s\": {pattern_rate:.0}}}",
        bandwidth / 28.0
    );
}
