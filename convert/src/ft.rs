//! CodeGen -> FasterTransformer GPT-J weights for N-way tensor parallelism: FauxPilot's
//! `codegen_gptj_convert.py` + `huggingface_gptj_convert.py` in one streamed pass, with the file
//! layout and splits of reference/fastertransformer-format.md §2 (raw little-endian arrays, no
//! header) and a config.ini that both FauxPilot's FT and FT >= 5.1 accept.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use zerotune_hf::{tokenizer, Dtype};

use crate::qkv::{split_qkv, MP_NUM};
use crate::source::Source;
use crate::{ConvertError, Result};

/// Vocab rows are padded up to a multiple of this (CodeGen ships 51200 = 50 x 1024).
pub const VOCAB_MULTIPLE: usize = 1024;
/// lm_head bias of padded rows: their logit is this, so they are never chosen (fits in fp16).
pub const PAD_LOGIT_BIAS: f32 = -1e4;

/// Every number the FT files, config.ini and config.pbtxt must agree on.
#[derive(Clone, Debug, PartialEq)]
pub struct FtModel {
    pub tp: usize,
    pub dtype: Dtype,
    pub head_num: usize,
    pub size_per_head: usize,
    /// fc_in rows as stored (CodeGen's n_inner, 4 x n_embd when unset).
    pub inter_size: usize,
    pub num_layer: usize,
    pub rotary_embedding: usize,
    /// Rows of model.wte.bin and the lm_head files: the source rows padded to VOCAB_MULTIPLE.
    pub vocab_size: usize,
    pub source_vocab_size: usize,
    pub max_seq_len: usize,
    pub start_id: i64,
    pub end_id: i64,
    pub layer_norm_epsilon: f64,
}

impl FtModel {
    /// Checks that `source` can be split `tp` ways in `dtype` and works out the FT shapes.
    pub fn plan(source: &Source, tp: usize, dtype: Dtype) -> Result<Self> {
        let c = &source.config;
        let invalid = |m: String| Err(ConvertError::Invalid(m));
        if !(tp.is_power_of_two() && tp <= 8) {
            return invalid(format!("--tp {tp}: FasterTransformer needs a power of two from 1 to 8"));
        }
        if !matches!(dtype, Dtype::F32 | Dtype::F16) {
            return invalid(format!("--dtype {}: FasterTransformer GPT-J weights are fp32 or fp16", dtype.torch_name()));
        }
        if c.n_head % MP_NUM != 0 {
            return invalid(format!("{}: n_head {} is not divisible by {MP_NUM}, CodeGen's qkv layout", source.dir.display(), c.n_head));
        }
        let inter_size = source.weights.info("transformer.h.0.mlp.fc_in.weight").map_or(c.inner_dim(), |(_, shape)| shape[0]);
        if c.n_head % tp != 0 || inter_size % tp != 0 {
            return invalid(format!("--tp {tp} must divide n_head ({}) and the MLP width ({inter_size})", c.n_head));
        }
        let (start_id, end_id) = match eos_from_tokenizer(&source.dir)? {
            Some(eos) => (eos, eos),
            None => {
                eprintln!("note: {} has no tokenizer files; start/end ids come from config.json", source.dir.display());
                (c.bos_token_id, c.eos_token_id)
            }
        };
        Ok(Self {
            tp,
            dtype,
            head_num: c.n_head,
            size_per_head: c.head_dim(),
            inter_size,
            num_layer: c.n_layer,
            rotary_embedding: c.rotary_dim,
            vocab_size: c.vocab_size.div_ceil(VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
            source_vocab_size: c.vocab_size,
            max_seq_len: c.n_positions,
            start_id,
            end_id,
            layer_norm_epsilon: c.layer_norm_epsilon,
        })
    }

    pub fn n_embd(&self) -> usize {
        self.head_num * self.size_per_head
    }

    /// `fp32` or `fp16`, as config.ini spells it.
    pub fn weight_data_type(&self) -> &'static str {
        if self.dtype == Dtype::F16 { "fp16" } else { "fp32" }
    }
}

/// The `<eos>` id of the tokenizer in `dir`, or None when it has no tokenizer files.
fn eos_from_tokenizer(dir: &Path) -> Result<Option<i64>> {
    if !tokenizer::TOKENIZER_FILES.iter().any(|f| dir.join(f).is_file()) {
        return Ok(None);
    }
    let tok = tokenizer::load(dir)?;
    let eos = tokenizer::eos_id(&tok)
        .ok_or_else(|| ConvertError::Invalid(format!("{}: the tokenizer has no <|endoftext|> token for start/end ids", dir.display())))?;
    Ok(Some(eos as i64))
}

/// How one source tensor becomes FT files.
enum Job {
    /// One file, same bytes; vocab-sized tensors padded to `FtModel::vocab_size` rows.
    Replicated { src: String, out: String, pad: Pad },
    /// q, k, v of one layer as [E, 3, E/N] per rank.
    Qkv(usize),
    /// FT stores srcᵀ split along its columns (src [out, in] -> rank R gets rows R of src, transposed);
    /// a 1-D src is simply cut in N pieces.
    Columns { src: String, out: String },
    /// FT stores srcᵀ split along its rows.
    Rows { src: String, out: String },
}

#[derive(Clone, Copy, PartialEq)]
enum Pad {
    None,
    ZeroRows,
    NegativeBias,
}

/// Every file of `model` in order: 5 + L x (3 + 5N) of them.
fn jobs(model: &FtModel) -> Vec<Job> {
    let replicated = |src: &str, out: &str, pad| Job::Replicated { src: src.into(), out: out.into(), pad };
    let mut jobs = vec![
        replicated("transformer.wte.weight", "model.wte", Pad::ZeroRows),
        replicated("lm_head.weight", "model.lm_head.weight", Pad::ZeroRows),
        replicated("lm_head.bias", "model.lm_head.bias", Pad::NegativeBias),
        replicated("transformer.ln_f.weight", "model.final_layernorm.weight", Pad::None),
        replicated("transformer.ln_f.bias", "model.final_layernorm.bias", Pad::None),
    ];
    for l in 0..model.num_layer {
        let (src, out) = (format!("transformer.h.{l}."), format!("model.layers.{l}."));
        let (s, o) = (|n: &str| format!("{src}{n}"), |n: &str| format!("{out}{n}"));
        jobs.extend([
            replicated(&s("ln_1.weight"), &o("input_layernorm.weight"), Pad::None),
            replicated(&s("ln_1.bias"), &o("input_layernorm.bias"), Pad::None),
            Job::Qkv(l),
            Job::Rows { src: s("attn.out_proj.weight"), out: o("attention.dense.weight") },
            Job::Columns { src: s("mlp.fc_in.weight"), out: o("mlp.dense_h_to_4h.weight") },
            Job::Columns { src: s("mlp.fc_in.bias"), out: o("mlp.dense_h_to_4h.bias") },
            Job::Rows { src: s("mlp.fc_out.weight"), out: o("mlp.dense_4h_to_h.weight") },
            replicated(&s("mlp.fc_out.bias"), &o("mlp.dense_4h_to_h.bias"), Pad::None),
        ]);
    }
    jobs
}

/// Writes every FT weight file of `source` and config.ini into `dir` (which must exist),
/// converting tensors in parallel, one at a time per thread. `final_dir` is where `dir` will be
/// moved when complete (config.ini records it).
pub fn write(source: &Source, model: &FtModel, dir: &Path, final_dir: &Path) -> Result<()> {
    let jobs = jobs(model);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<ConvertError>> = Mutex::new(None);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    let written = run_job(source, model, job).and_then(|files| {
                        files.into_iter().try_for_each(|(name, bytes)| write_file(&dir.join(name), &bytes))
                    });
                    if let Err(err) = written {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(err);
                    }
                }
            });
        }
    });
    if let Some(err) = first_error.into_inner().unwrap() {
        return Err(err);
    }
    write_file(&dir.join("config.ini"), config_ini(source, model, final_dir).as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| ConvertError::Invalid(format!("cannot write {}: {e}", path.display())))
}

/// The (file name, bytes) pairs one job produces.
fn run_job(source: &Source, model: &FtModel, job: &Job) -> Result<Vec<(String, Vec<u8>)>> {
    let (n, dtype, elem) = (model.tp, model.dtype, model.dtype.size());
    let shape_of = |name: &str| source.weights.info(name).map(|(_, s)| s.to_vec()).unwrap_or_default();
    Ok(match job {
        Job::Replicated { src, out, pad } => {
            let mut data = source.bytes(src, dtype)?;
            let rows = model.vocab_size - model.source_vocab_size;
            match pad {
                Pad::None => {}
                Pad::ZeroRows => data.resize(data.len() + rows * model.n_embd() * elem, 0),
                Pad::NegativeBias => {
                    let value = crate::source::cast_bytes(&PAD_LOGIT_BIAS.to_le_bytes(), Dtype::F32, dtype);
                    (0..rows).for_each(|_| data.extend_from_slice(&value));
                }
            }
            vec![(format!("{out}.bin"), data)]
        }
        Job::Qkv(l) => {
            let e = model.n_embd();
            let qkv = source.bytes(&format!("transformer.h.{l}.attn.qkv_proj.weight"), dtype)?;
            let (q, k, v) = split_qkv(&qkv, e, elem);
            let chunk = e * e / n * elem;
            (0..n)
                .map(|r| {
                    // Each projection's output rows for rank r, transposed to [in, out/N] ...
                    let t: Vec<Vec<u8>> = [&q, &k, &v].iter().map(|m| transpose(&m[r * chunk..][..chunk], e / n, e, elem)).collect();
                    // ... then interleaved row by row into [in, 3 (q, k, v), out/N].
                    let row = e / n * elem;
                    let mut data = Vec::with_capacity(3 * chunk);
                    for i in 0..e {
                        t.iter().for_each(|m| data.extend_from_slice(&m[i * row..][..row]));
                    }
                    (format!("model.layers.{l}.attention.query_key_value.weight.{r}.bin"), data)
                })
                .collect()
        }
        Job::Columns { src, out } => {
            let shape = shape_of(src);
            let data = source.bytes(src, dtype)?;
            let piece = data.len() / n;
            (0..n)
                .map(|r| {
                    let part = &data[r * piece..][..piece];
                    let bytes = if shape.len() == 2 { transpose(part, shape[0] / n, shape[1], elem) } else { part.to_vec() };
                    (format!("{out}.{r}.bin"), bytes)
                })
                .collect()
        }
        Job::Rows { src, out } => {
            let shape = shape_of(src);
            let t = transpose(&source.bytes(src, dtype)?, shape[0], shape[1], elem);
            let piece = t.len() / n;
            (0..n).map(|r| (format!("{out}.{r}.bin"), t[r * piece..][..piece].to_vec())).collect()
        }
    })
}

/// The transpose of a row-major [rows, cols] matrix of `elem`-byte values.
pub fn transpose(data: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    match elem {
        2 => transpose_width::<2>(data, rows, cols),
        4 => transpose_width::<4>(data, rows, cols),
        _ => unreachable!("FT weights are fp16 or fp32"),
    }
}

fn transpose_width<const W: usize>(data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    const TILE: usize = 32;
    let (src, rest) = data.as_chunks::<W>();
    assert!(rest.is_empty() && src.len() == rows * cols, "matrix bytes do not match its shape");
    let mut out = vec![[0u8; W]; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    out.into_flattened()
}

/// config.ini: `[gpt]` as FauxPilot's converter writes it (its arguments and the GPT-J config)
/// and `[gptj]` as NVIDIA's does, which FT >= 5.1 requires.
pub fn config_ini(source: &Source, model: &FtModel, dir: &Path) -> String {
    let c = &source.config;
    let mut ini = String::from("[gpt]\n");
    let gpt: [(&str, String); 22] = [
        ("saved_dir", dir.parent().unwrap_or(dir).display().to_string()),
        ("in_file", std::path::absolute(&source.dir).unwrap_or_else(|_| source.dir.clone()).display().to_string()),
        ("trained_gpu_num", "1".into()),
        ("infer_gpu_num", model.tp.to_string()),
        ("weight_data_type", model.weight_data_type().into()),
        ("model_name", "gptj".into()),
        ("vocab_size", model.vocab_size.to_string()),
        ("n_positions", c.n_positions.to_string()),
        ("n_embd", c.n_embd.to_string()),
        ("n_layer", c.n_layer.to_string()),
        ("n_head", c.n_head.to_string()),
        ("n_inner", model.inter_size.to_string()),
        ("rotary_dim", c.rotary_dim.to_string()),
        ("activation_function", c.activation_function.clone()),
        ("layer_norm_epsilon", c.layer_norm_epsilon.to_string()),
        ("bos_token_id", c.bos_token_id.to_string()),
        ("eos_token_id", c.eos_token_id.to_string()),
        ("head_num", model.head_num.to_string()),
        ("size_per_head", model.size_per_head.to_string()),
        ("inter_size", model.inter_size.to_string()),
        ("num_layer", model.num_layer.to_string()),
        ("tensor_para_size", model.tp.to_string()),
    ];
    for (key, value) in gpt {
        writeln!(ini, "{key} = {value}").unwrap();
    }
    ini.push_str("\n[gptj]\n");
    let gptj: [(&str, String); 11] = [
        ("head_num", model.head_num.to_string()),
        ("size_per_head", model.size_per_head.to_string()),
        ("inter_size", model.inter_size.to_string()),
        ("num_layer", model.num_layer.to_string()),
        ("rotary_embedding", model.rotary_embedding.to_string()),
        ("vocab_size", model.vocab_size.to_string()),
        ("start_id", model.start_id.to_string()),
        ("end_id", model.end_id.to_string()),
        ("max_pos_seq_len", model.max_seq_len.to_string()),
        ("weight_data_type", model.weight_data_type().into()),
        ("tensor_para_size", model.tp.to_string()),
    ];
    for (key, value) in gptj {
        writeln!(ini, "{key} = {value}").unwrap();
    }
    ini
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_element() {
        let (rows, cols) = (37, 70); // not multiples of the tile
        let m: Vec<u8> = (0..rows * cols).flat_map(|i| (i as u32).to_le_bytes()).collect();
        let t = transpose(&m, rows, cols, 4);
        for r in 0..rows {
            for c in 0..cols {
                let at = u32::from_le_bytes(t[(c * rows + r) * 4..][..4].try_into().unwrap());
                assert_eq!(at as usize, r * cols + c);
            }
        }
        assert_eq!(transpose(&t, cols, rows, 4), m);
    }
}
