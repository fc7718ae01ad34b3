//! NeoX-style rotary position embedding, as the Llama family applies it (HF
//! `LlamaRotaryEmbedding`, `rotate_half`, `apply_rotary_pos_emb`): the two halves of every head
//! turn against each other over the whole head_dim D, with inv_freq `1 / θ^(2i/D)`, scaled as the
//! config's rope type says (linear, llama3, yarn). CodeGen's GPT-J pairs are `rotary.rs`.

use tch::{Device, Kind, Tensor};
use zerotune_hf::decoder::RopeScaling;
use zerotune_hf::DecoderConfig;

/// cos and sin for every position, (max_position_embeddings, D) each.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The tables of one token per row, (N, 1, 1, D) each, shared by every layer of a decode step.
pub struct RowAngles {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Computes the tables in f32 with HF's ops (θ as an f32 tensor: bit-equal to torch's scalar
    /// pow), then keeps them in `kind` on `device`, as HF casts them to the activations' dtype.
    pub fn new(config: &DecoderConfig, kind: Kind, device: Device) -> Rope {
        let (inv_freq, attention_factor) = inv_freq(config);
        let positions = Tensor::arange(config.max_position_embeddings as i64, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
        let angles = positions.outer(&inv_freq);
        let angles = Tensor::cat(&[&angles, &angles], -1);
        let table = |t: Tensor| (t * attention_factor).to_kind(kind).to_device(device);
        Rope { cos: table(angles.cos()), sin: table(angles.sin()) }
    }

    /// xs (B, heads, T, D) at positions `start..start + T`, rotated.
    pub fn apply(&self, xs: &Tensor, start: i64) -> Tensor {
        let t = xs.size()[2];
        rotate(xs, &self.cos.narrow(0, start, t), &self.sin.narrow(0, start, t))
    }

    /// The tables of row i at `positions[i]` (N,).
    pub fn at(&self, positions: &Tensor) -> RowAngles {
        let rows = |table: &Tensor| table.index_select(0, positions).unsqueeze(1).unsqueeze(1);
        RowAngles { cos: rows(&self.cos), sin: rows(&self.sin) }
    }

    /// xs (N, heads, 1, D), row i turned by its own angles.
    pub fn apply_rows(&self, xs: &Tensor, angles: &RowAngles) -> Tensor {
        rotate(xs, &angles.cos, &angles.sin)
    }
}

/// HF's inverse frequencies (D/2,) in f32 for the config's rope type, and the factor cos and sin
/// are scaled by (1 but for YaRN), with HF's ops in HF's order (`modeling_rope_utils.py`).
fn inv_freq(config: &DecoderConfig) -> (Tensor, f64) {
    let d = config.head_dim as i64;
    let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
    let pos_freqs = Tensor::from(config.rope_theta as f32).pow(&exponent);
    let inv = pos_freqs.reciprocal();
    match config.rope_scaling {
        RopeScaling::None => (inv, 1.0),
        RopeScaling::Linear { factor } => (inv / factor, 1.0),
        RopeScaling::Llama3 { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: old } => {
            let old = old as f64;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            // A Python number over a tensor, as torch divides it: the number in f32, then an
            // elementwise division.
            let over = |number: f64, t: &Tensor| t.full_like(number) / t;
            let wavelen = over(2.0 * std::f64::consts::PI, &inv);
            let scaled = (&inv / factor).where_self(&wavelen.gt(low_wavelen), &inv);
            let smooth: Tensor = (over(old, &wavelen) - low) / (high - low);
            let smoothed: Tensor = (-&smooth + 1.0) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.lt(high_wavelen).logical_not().logical_and(&wavelen.gt(low_wavelen).logical_not());
            (smoothed.where_self(&medium, &scaled), 1.0)
        }
        RopeScaling::Yarn { factor, original_max_position_embeddings: old, attention_factor, beta_fast, beta_slow, truncate } => {
            // The dimension that turns `rotations` times over the original context.
            let (dims, base) = (d as f64, config.rope_theta);
            let correction = |rotations: f64| dims * (old as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
            let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dims - 1.0));
            if low == high {
                high += 0.001;
            }
            let ramp = ((Tensor::arange(d / 2, (Kind::Float, Device::Cpu)) - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation: Tensor = -ramp + 1.0;
            let interpolation = (&pos_freqs * factor).reciprocal();
            (interpolation * (-&extrapolation + 1.0) + inv * &extrapolation, attention_factor)
        }
    }
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = cat(-x[D/2..], x[..D/2])`.
fn rotate(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = xs.size()[3] / 2;
    let rotated = Tensor::cat(&[-xs.narrow(3, half, half), xs.narrow(3, 0, half)], 3);
    xs * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_turned_at_its_position_equals_the_sequence_turn() {
        let config = DecoderConfig::builtin("tiny-llama").unwrap();
        let rope = Rope::new(&config, Kind::Float, Device::Cpu);
        let xs = Tensor::randn([1, 2, 9, config.head_dim as i64], (Kind::Float, Device::Cpu));
        let whole = rope.apply(&xs, 3);
        let positions = Tensor::from_slice(&[3i64 + 7]);
        let row = rope.apply_rows(&xs.narrow(2, 7, 1), &rope.at(&positions));
        assert!(row.equal(&whole.narrow(2, 7, 1)));
        // Position 0 is the identity.
        assert!(rope.apply(&xs, 0).narrow(2, 0, 1).equal(&xs.narrow(2, 0, 1)));
    }
}
