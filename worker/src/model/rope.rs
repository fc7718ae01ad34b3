//! NeoX-style rotary position embedding, as the Llama family applies it (HF
//! `LlamaRotaryEmbedding`, `rotate_half`, `apply_rotary_pos_emb`): the two halves of every head
//! turn against each other over the whole head_dim D, with inv_freq `1 / θ^(2i/D)` (divided by
//! the factor for linear scaling). CodeGen's GPT-J pairs are `rotary.rs`.

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
        let d = config.head_dim as i64;
        let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
        let mut inv_freq = Tensor::from(config.rope_theta as f32).pow(&exponent).reciprocal();
        if let RopeScaling::Linear { factor } = config.rope_scaling {
            inv_freq = inv_freq / factor;
        }
        let positions = Tensor::arange(config.max_position_embeddings as i64, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
        let angles = positions.outer(&inv_freq);
        let angles = Tensor::cat(&[&angles, &angles], -1);
        Rope { cos: angles.cos().to_kind(kind).to_device(device), sin: angles.sin().to_kind(kind).to_device(device) }
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
