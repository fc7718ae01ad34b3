//! Optimizer pieces: AdamW (torch semantics) over flat f32 slices on the host in parallel, the
//! offloaded optimizer that feeds it tile by tile, AdamW with torch ops on the device,
//! learning-rate schedules (HF `get_*_schedule_with_warmup`), and DeepSpeed's dynamic fp16 loss
//! scaler.

pub mod adamw;
pub mod device_adam;
pub mod loss_scale;
pub mod offload;
pub mod schedule;
