//! AdamW with torch ops on the compute device (ZeRO without offload): the same update as
//! `adamw.rs`, op for op as `torch.optim.AdamW`'s single-tensor path, on fp32 tensors.

use tch::{Kind, Tensor};
use zerotune_proto::plan::AdamW as Hyper;

use super::adamw::Segment;
use crate::error::Result;

/// fp32 master weights and moments for a contiguous slice of the flat parameters, on the device.
pub struct DeviceAdam {
    pub master: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub steps: u64,
}

impl DeviceAdam {
    pub fn new(master: Tensor) -> Self {
        let master = master.to_kind(Kind::Float);
        Self { exp_avg: master.zeros_like(), exp_avg_sq: master.zeros_like(), master, steps: 0 }
    }

    /// One AdamW step with gradient `grad * grad_scale` at learning rate `lr`.
    pub fn step(&mut self, grad: &Tensor, grad_scale: f64, lr: f64, hyper: &Hyper, segments: &[Segment]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - hyper.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - hyper.beta2.powi(t)).sqrt();
        let grad = grad.f_mul_scalar(grad_scale as f32 as f64)?;
        for seg in segments.iter().filter(|s| s.decay) {
            let _ = self.master.narrow(0, seg.start as i64, (seg.end - seg.start) as i64).f_mul_scalar_(1.0 - lr * hyper.weight_decay)?;
        }
        let _ = self.exp_avg.f_lerp_(&grad, 1.0 - hyper.beta1)?;
        let _ = self.exp_avg_sq.f_mul_scalar_(hyper.beta2)?.f_addcmul_(&grad, &grad.f_mul_scalar(1.0 - hyper.beta2)?)?;
        let denom = (self.exp_avg_sq.f_sqrt()? / bias_correction2_sqrt).f_add_scalar(hyper.eps)?;
        let _ = self.master.f_addcdiv_(&(&self.exp_avg * (-lr / bias_correction1)), &denom)?;
        Ok(())
    }
}
