//! The completion evaluation at the end of `train --do_eval`: `worker eval` on the validation
//! documents, handed over on its standard input (no copy of them is written anywhere), the
//! starting model (when training did not start from scratch) against the final one. Its table
//! goes to this process's stdout, its files into the output dir.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use zerotune_data::Document;
use zerotune_proto::plan::Precision;

use crate::config::{Device, ModelChoice, TrainPlan};
use crate::error::{CoordinatorError, EvalFailure, Result};

pub fn run(plan: &TrainPlan, output_dir: &Path, documents: &[Document], block_size: usize) -> Result<()> {
    let worker = &plan.launch.worker_bin;
    let mut command = Command::new(worker);
    command.arg("eval").arg("--model").arg(output_dir).arg("--validation_file").arg("-").arg("--output_dir").arg(output_dir);
    command.args(["--num_positions", &plan.output.completion_eval_positions.to_string(), "--block_size", &block_size.to_string()]);
    command.args(["--seed", &plan.training.seed.to_string(), "--device", &plan.launch.device.to_string()]);
    if let ModelChoice::Pretrained(base) = &plan.model {
        command.arg("--base").arg(base);
    }
    // On a GPU, in the precision it trained in (a P40's fp32 included); on the CPU, fp32.
    if plan.launch.device != Device::Cpu {
        let dtype = match plan.training.precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        };
        command.args(["--dtype", dtype]);
    }
    let failed = |failure| CoordinatorError::CompletionEval { worker: worker.clone(), output_dir: output_dir.into(), failure };
    let mut child = command.stdin(Stdio::piped()).spawn().map_err(|e| failed(EvalFailure::Start(e)))?;
    {
        let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("piped"));
        for doc in documents {
            let line = serde_json::json!({"text": doc.text, "url": doc.url});
            if writeln!(stdin, "{line}").is_err() {
                break; // it exited early: its status says why
            }
        }
        let _ = stdin.flush();
    }
    let status = child.wait().map_err(|e| failed(EvalFailure::Wait(e)))?;
    if !status.success() {
        return Err(failed(EvalFailure::Exited(status)));
    }
    Ok(())
}
