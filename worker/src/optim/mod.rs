//! Optimizer pieces as plain functions over flat f32 slices: AdamW (torch semantics, run on the
//! host in parallel), learning-rate schedules (HF `get_*_schedule_with_warmup`), and DeepSpeed's
//! dynamic fp16 loss scaler.

pub mod adamw;
pub mod device_adam;
pub mod loss_scale;
pub mod schedule;
