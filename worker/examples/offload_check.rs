//! The offloaded optimizer step (`HostOptimizer::step`) on one device against another, on fixed
//! random gradients: 3 steps in small tiles (so transfers are in flight while the host updates a
//! neighbouring tile), for fp32, bf16 and fp16 parameters; the fp32 master weights and the
//! parameters on the device must be bit for bit those of the reference device. bench/gpu.sh runs
//! it as `cuda` vs `cpu`; `cpu` vs `cpu` is its dry run.
//!   cargo run --example offload_check -p zerotune-worker -- [DEVICE [REFERENCE [ELEMENTS [TILE]]]]

use tch::{Device, Kind, Tensor};
use zerotune_proto::plan::AdamW;
use zerotune_worker::optim::adamw::Segment;
use zerotune_worker::optim::offload::HostOptimizer;

/// The final (master, parameters as raw bits) of 3 steps on `device`.
fn run(device: Device, kind: Kind, n: usize, tile: usize) -> anyhow::Result<(Vec<f32>, Vec<u8>)> {
    tch::manual_seed(11);
    let master: Vec<f32> = Vec::try_from(Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * 0.02)?;
    // Gradients spread over many binades, as fp16's transfer scaling must handle.
    let grads: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * Tensor::randn([n as i64], (Kind::Float, Device::Cpu)).exp() * 1e-3)
        .collect();
    let mut params = Tensor::from_slice(&master).to_kind(kind).to_device(device);
    let mut optimizer = HostOptimizer::new(master, kind, device, tile);
    let hyper = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let segments = [Segment { start: 0, end: n / 3, decay: true }, Segment { start: n / 3, end: n, decay: false }];
    let _guard = tch::no_grad_guard();
    for (step, grad) in grads.iter().enumerate() {
        let scale = if kind == Kind::Half { 1.0 / 1024.0 } else { 1.0 };
        let grad = (grad * (1.0 / scale)).to_device(device);
        optimizer.step(&grad, &mut params, scale, 1e-3 * (step + 1) as f64, &hyper, &segments)?;
    }
    let host = params.to_device(Device::Cpu).contiguous();
    let mut bits = vec![0u8; n * kind.elt_size_in_bytes()];
    host.f_copy_data_u8(&mut bits, n)?;
    Ok((optimizer.adam.master.clone(), bits))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let (device, reference) = (zerotune_worker::device::parse(&arg(0, "cpu"))?, zerotune_worker::device::parse(&arg(1, "cpu"))?);
    let n: usize = arg(2, "100003").parse()?;
    let tile: usize = arg(3, "1000").parse()?;
    let mut failed = false;
    for (name, kind) in [("fp32", Kind::Float), ("bf16", Kind::BFloat16), ("fp16", Kind::Half)] {
        let (master, bits) = run(device, kind, n, tile)?;
        let (want_master, want_bits) = run(reference, kind, n, tile)?;
        let master_diff = master.iter().zip(&want_master).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let width = kind.elt_size_in_bytes();
        let param_diff = bits.chunks(width).zip(want_bits.chunks(width)).filter(|(a, b)| a != b).count();
        let ok = master_diff == 0 && param_diff == 0;
        failed |= !ok;
        println!(
            "offload step {name}, {n} elements in tiles of {tile}, 3 steps, {device:?} vs {reference:?}: master {master_diff} / params {param_diff} elements differ: {}",
            if ok { "bit-equal" } else { "FAIL" }
        );
    }
    if failed {
        anyhow::bail!("the offloaded step differs between {device:?} and {reference:?}");
    }
    Ok(())
}
