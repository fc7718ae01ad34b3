//! CodeGen -> FasterTransformer GPT-J weights for N-way tensor parallelism: FauxPilot's
//! `codegen_gptj_convert.py` + `huggingface_gptj_convert.py` in one streamed pass, with the file
//! layout and splits of docs/formats.md, FasterTransformer section (raw little-endian arrays, no
//! header) and a config.ini that both FauxPilot's FT and FT >= 5.1 accept.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use zerotune_hf::manifest::NonFinite;
use zerotune_hf::{tokenizer, Dtype, MP_NUM};

use crate::cast::{cast_into, transpose_into, Transpose};
use crate::qkv::split_qkv;
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
        if !c.n_head.is_multiple_of(MP_NUM) {
            return invalid(format!("{}: n_head {} is not divisible by {MP_NUM}, CodeGen's qkv layout", source.dir.display(), c.n_head));
        }
        let inter_size = source.weights.info("transformer.h.0.mlp.fc_in.weight").map_or(c.inner_dim(), |(_, shape)| shape[0]);
        if !c.n_head.is_multiple_of(tp) || !inter_size.is_multiple_of(tp) {
            return invalid(format!("--tp {tp} must divide n_head ({}) and the MLP width ({inter_size})", c.n_head));
        }
        let (start_id, end_id) = match eos_from_tokenizer(&source.dir)? {
            Some(eos) => (eos, eos),
            None => {
                tracing::info!("note: {} has no tokenizer files; start/end ids come from config.json", source.dir.display());
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
        if self.dtype == Dtype::F16 {
            "fp16"
        } else {
            "fp32"
        }
    }
}

/// Opens `input` (verified, see `Source::open`) and plans its conversion for `tp` ranks in `dtype`; says on stderr when vocab
/// rows are padded.
pub fn open_planned(input: &Path, nonfinite: NonFinite, tp: usize, dtype: Dtype) -> Result<(Source, FtModel)> {
    let source = Source::open(input, nonfinite)?;
    let model = FtModel::plan(&source, tp, dtype)?;
    if model.vocab_size != model.source_vocab_size {
        tracing::info!(
            "note: {} vocab rows padded to {} (a multiple of {VOCAB_MULTIPLE}): zero embedding and lm_head rows, lm_head bias {PAD_LOGIT_BIAS} so padded ids are never chosen",
            model.source_vocab_size, model.vocab_size,
        );
    }
    Ok((source, model))
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
enum Conversion {
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
fn jobs(model: &FtModel) -> Vec<Conversion> {
    let replicated = |src: &str, out: &str, pad| Conversion::Replicated { src: src.into(), out: out.into(), pad };
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
            Conversion::Qkv(l),
            Conversion::Rows { src: s("attn.out_proj.weight"), out: o("attention.dense.weight") },
            Conversion::Columns { src: s("mlp.fc_in.weight"), out: o("mlp.dense_h_to_4h.weight") },
            Conversion::Columns { src: s("mlp.fc_in.bias"), out: o("mlp.dense_h_to_4h.bias") },
            Conversion::Rows { src: s("mlp.fc_out.weight"), out: o("mlp.dense_4h_to_h.weight") },
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
                let mut scratch = vec![];
                while !failed.load(Ordering::Relaxed) {
                    let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    if let Err(err) = run_job(source, model, job, dir, &mut scratch) {
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

/// Converts one source tensor into its FT file(s) in `dir`, through `scratch` (reused across
/// jobs, so each thread faults in its largest output once).
fn run_job(source: &Source, model: &FtModel, job: &Conversion, dir: &Path, scratch: &mut Vec<u8>) -> Result<()> {
    let (n, to, elem) = (model.tp, model.dtype, model.dtype.size());
    let src = match job {
        Conversion::Replicated { src, .. } | Conversion::Columns { src, .. } | Conversion::Rows { src, .. } => src.clone(),
        Conversion::Qkv(l) => format!("transformer.h.{l}.attn.qkv_proj.weight"),
    };
    let (from, shape, stored) = source.stored(&src)?;
    let data = stored.as_slice();
    let zeroed = |scratch: &mut Vec<u8>, len: usize| {
        scratch.clear();
        scratch.resize(len, 0);
    };
    match job {
        Conversion::Replicated { out, pad, .. } => {
            cast_into(scratch, data, from, to);
            let rows = model.vocab_size - model.source_vocab_size;
            match pad {
                Pad::None => {}
                Pad::ZeroRows => scratch.resize(scratch.len() + rows * model.n_embd() * elem, 0),
                Pad::NegativeBias => {
                    let mut value = vec![];
                    cast_into(&mut value, &PAD_LOGIT_BIAS.to_le_bytes(), Dtype::F32, to);
                    (0..rows).for_each(|_| scratch.extend_from_slice(&value));
                }
            }
            write_file(&dir.join(format!("{out}.bin")), scratch)?;
        }
        Conversion::Qkv(l) => {
            // q, k, v in the source dtype; rank r's output rows of each, transposed and
            // interleaved into [in, 3 (q, k, v), out/N].
            let e = model.n_embd();
            let (q, k, v) = split_qkv(data, e, from.size());
            let rows = e / n;
            let part = rows * e * from.size();
            for r in 0..n {
                zeroed(scratch, 3 * rows * e * elem);
                for (j, m) in [&q, &k, &v].into_iter().enumerate() {
                    let t = Transpose { rows, cols: e, ld: 3 * rows, offset: j * rows };
                    transpose_into(scratch, &m[r * part..][..part], t, from, to);
                }
                write_file(&dir.join(format!("model.layers.{l}.attention.query_key_value.weight.{r}.bin")), scratch)?;
            }
        }
        Conversion::Columns { out, .. } => {
            let part = data.len() / n;
            for r in 0..n {
                let piece = &data[r * part..][..part];
                if let [rows, cols] = *shape {
                    zeroed(scratch, rows / n * cols * elem);
                    transpose_into(scratch, piece, Transpose::plain(rows / n, cols), from, to);
                } else {
                    cast_into(scratch, piece, from, to);
                }
                write_file(&dir.join(format!("{out}.{r}.bin")), scratch)?;
            }
        }
        Conversion::Rows { out, .. } => {
            let [rows, cols] = *shape else { unreachable!("row-split tensors are matrices") };
            zeroed(scratch, rows * cols * elem);
            transpose_into(scratch, data, Transpose::plain(rows, cols), from, to);
            for (r, piece) in scratch.chunks(scratch.len() / n).enumerate() {
                write_file(&dir.join(format!("{out}.{r}.bin")), piece)?;
            }
        }
    }
    Ok(())
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
