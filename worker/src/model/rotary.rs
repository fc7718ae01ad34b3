//! GPT-J style rotary position embedding as CodeGen uses it (HF `create_sinusoidal_positions`,
//! `rotate_every_two`, `apply_rotary_pos_emb`): channel pairs (2i, 2i+1) of the first
//! `rotary_dim` channels, theta_i = pos * 10000^(-2i/rotary_dim).

use tch::{Device, Kind, Tensor};

use crate::dtype::host_slice;

/// Sine and cosine tables for every position, (n_positions, rotary_dim/2) each.
pub struct Rotary {
    sin: Tensor,
    cos: Tensor,
    rotary_dim: i64,
}

impl Rotary {
    /// Computes the tables in f32 with the same ops as HF, then keeps them in `kind` on `device`.
    pub fn new(n_positions: i64, rotary_dim: i64, kind: Kind, device: Device) -> Self {
        let exponent = Tensor::arange_start_step(0, rotary_dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / rotary_dim as f64;
        let inv_freq = Tensor::from(10000f32).pow(&exponent).reciprocal();
        let positions = Tensor::arange(n_positions, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float);
        let angles = positions.outer(&inv_freq);
        Self { sin: angles.sin().to_kind(kind).to_device(device), cos: angles.cos().to_kind(kind).to_device(device), rotary_dim }
    }

    /// Rotates the first `rotary_dim` channels of every head, positions `start..start + T`.
    /// xs: (B, T, H, D) -> (B, T, H, D)
    pub fn apply(&self, xs: &Tensor, start: i64) -> Tensor {
        let t = xs.size()[1];
        let table = |table: &Tensor| table.narrow(0, start, t).unsqueeze(0);
        self.rotate(xs, &self.spread(&table(&self.sin), &table(&self.cos)))
    }

    /// The angles of one token per row, row i at `positions[i]` (N,), for `rotate`; a decode step
    /// makes them once for all its layers.
    pub fn angles_at(&self, positions: &Tensor) -> Angles {
        let table = |table: &Tensor| table.index_select(0, positions).unsqueeze(1);
        self.spread(&table(&self.sin), &table(&self.cos))
    }

    /// Sines and cosines (B or 1, T, rotary_dim/2) repeated for both channels of each pair.
    fn spread(&self, sin: &Tensor, cos: &Tensor) -> Angles {
        let (rows, t) = (sin.size()[0], sin.size()[1]);
        let spread = |table: &Tensor| table.repeat_interleave_self_int(2, Some(2), None).view([rows, t, 1, self.rotary_dim]);
        Angles { sin: spread(sin), cos: spread(cos) }
    }

    /// xs (B, T, H, D) rotated by `angles` (of B or 1 rows and T positions).
    pub fn rotate(&self, xs: &Tensor, angles: &Angles) -> Tensor {
        self.rotate_in_one_pass(xs, angles).unwrap_or_else(|| self.rotate_by_ops(xs, angles))
    }

    /// `rotate` by tensor ops: any device and kind, and autograd.
    fn rotate_by_ops(&self, xs: &Tensor, angles: &Angles) -> Tensor {
        let (b, t, _, d) = xs.size4().expect("rotary input is (B, T, H, D)");
        let rd = self.rotary_dim;
        if rd == 0 {
            return xs.shallow_clone();
        }
        debug_assert!(
            [1, b].contains(&angles.sin.size()[0]) && angles.sin.size()[1] == t,
            "angles for {:?}, input {:?}",
            angles.sin.size(),
            xs.size()
        );
        let rot = xs.narrow(3, 0, rd);
        let rotated = &rot * &angles.cos + rotate_every_two(&rot) * &angles.sin;
        if rd == d {
            rotated
        } else {
            Tensor::cat(&[rotated, xs.narrow(3, rd, d - rd)], 3)
        }
    }

    /// `rotate` in one pass over fp32 values on the CPU without autograd: a decode step of
    /// codegen-350M rotates 40 times, and the ~10 tensor ops took 12-19 µs a call against 1-4 here
    /// (1 and 8 rows). Each product and sum is rounded as the ops round them (Rust does not fuse
    /// `a * b + c`): the same bits. None where it does not apply.
    fn rotate_in_one_pass(&self, xs: &Tensor, angles: &Angles) -> Option<Tensor> {
        let (b, t, h, d) = xs.size4().ok()?;
        let rows = angles.sin.size()[0];
        let applies = [xs, &angles.sin, &angles.cos].iter().all(|x| x.device() == Device::Cpu && x.kind() == Kind::Float)
            && !xs.requires_grad()
            && self.rotary_dim > 0
            && xs.numel() > 0
            && angles.sin.is_contiguous()
            && angles.cos.is_contiguous()
            && (rows == 1 || rows == b)
            && angles.sin.size() == [rows, t, 1, self.rotary_dim];
        if !applies {
            return None;
        }
        let xs = xs.contiguous();
        let out = Tensor::empty([b, t, h, d], (Kind::Float, Device::Cpu));
        let (x, sin, cos) = (host_slice::<f32>(&xs), host_slice::<f32>(&angles.sin), host_slice::<f32>(&angles.cos));
        // SAFETY: `out` is a fresh contiguous fp32 CPU tensor of x's length (not empty), so nothing
        // else aliases it.
        let y = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, x.len()) };
        let (t, h, d, rd) = (t as usize, h as usize, d as usize, self.rotary_dim as usize);
        for (head, (x, y)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let token = head / h; // row · T + position
            let angle = if rows == 1 { token % t } else { token } * rd;
            let (sin, cos) = (&sin[angle..angle + rd], &cos[angle..angle + rd]);
            for i in (0..rd).step_by(2) {
                // (x0, x1) · cos + (-x1, x0) · sin, as `rotate_by_ops` computes it.
                y[i] = x[i] * cos[i] + -x[i + 1] * sin[i];
                y[i + 1] = x[i + 1] * cos[i + 1] + x[i] * sin[i + 1];
            }
            y[rd..].copy_from_slice(&x[rd..]);
        }
        Some(out)
    }
}

/// Rotation angles as `Rotary::rotate` takes them: sines and cosines, (B or 1, T, 1, rotary_dim).
pub struct Angles {
    sin: Tensor,
    cos: Tensor,
}

/// (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis.
fn rotate_every_two(xs: &Tensor) -> Tensor {
    let even = xs.slice(-1, 0, None, 2);
    let odd = xs.slice(-1, 1, None, 2);
    Tensor::stack(&[-odd, even], -1).flatten(-2, -1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_by_position_zero_is_identity_and_preserves_norm() {
        let rotary = Rotary::new(16, 4, Kind::Float, Device::Cpu);
        let xs = Tensor::randn([1, 3, 2, 6], (Kind::Float, Device::Cpu));
        let out = rotary.apply(&xs, 0);
        // Position 0 has angle 0: unchanged.
        assert!(out.narrow(1, 0, 1).allclose(&xs.narrow(1, 0, 1), 1e-6, 1e-6, false));
        // A rotation keeps the norm of each pair; channels past rotary_dim pass through.
        let pair_norm = |t: &Tensor| t.narrow(3, 0, 4).square().sum_dim_intlist(3, false, Kind::Float);
        assert!(pair_norm(&out).allclose(&pair_norm(&xs), 1e-5, 1e-5, false));
        assert!(out.narrow(3, 4, 2).equal(&xs.narrow(3, 4, 2)));
    }

    #[test]
    fn the_one_pass_rotation_has_the_bits_of_the_tensor_ops() {
        for (rotary_dim, head_dim) in [(4, 6), (6, 6), (0, 6), (32, 64)] {
            let rotary = Rotary::new(64, rotary_dim, Kind::Float, Device::Cpu);
            let rows = Tensor::from_slice(&[9i64, 0, 63]);
            for (xs, angles) in [
                (Tensor::randn([3, 1, 4, head_dim], (Kind::Float, Device::Cpu)), rotary.angles_at(&rows)),
                (Tensor::randn([2, 5, 4, head_dim], (Kind::Float, Device::Cpu)) * 100, {
                    let table = |t: &Tensor| t.narrow(0, 7, 5).unsqueeze(0);
                    rotary.spread(&table(&rotary.sin), &table(&rotary.cos))
                }),
                (Tensor::randn([2, 5, 4, head_dim], (Kind::Float, Device::Cpu)), {
                    let table = |t: &Tensor| Tensor::cat(&[t.narrow(0, 7, 5).unsqueeze(0), t.narrow(0, 30, 5).unsqueeze(0)], 0);
                    rotary.spread(&table(&rotary.sin), &table(&rotary.cos))
                }),
            ] {
                let by_ops = rotary.rotate_by_ops(&xs, &angles);
                let Some(one_pass) = rotary.rotate_in_one_pass(&xs, &angles) else {
                    assert_eq!(rotary_dim, 0, "fp32 on the CPU with rotary channels goes in one pass");
                    continue;
                };
                assert!(one_pass.equal(&by_ops), "rotary_dim {rotary_dim}, input {:?}", xs.size());
            }
        }
        let needs_grad = Tensor::randn([1, 1, 2, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let rotary = Rotary::new(16, 4, Kind::Float, Device::Cpu);
        assert!(rotary.rotate_in_one_pass(&needs_grad, &rotary.angles_at(&Tensor::from_slice(&[3i64]))).is_none());
    }

    #[test]
    fn one_token_per_row_at_its_own_position_equals_a_sequence_at_that_position() {
        for (rotary_dim, head_dim) in [(4, 6), (6, 6), (0, 6)] {
            let rotary = Rotary::new(16, rotary_dim, Kind::Float, Device::Cpu);
            let xs = Tensor::randn([3, 1, 2, head_dim], (Kind::Float, Device::Cpu));
            let positions = [9i64, 0, 15];
            let batched = rotary.rotate(&xs, &rotary.angles_at(&Tensor::from_slice(&positions)));
            for (row, &position) in positions.iter().enumerate() {
                let alone = rotary.apply(&xs.narrow(0, row as i64, 1), position);
                assert!(batched.narrow(0, row as i64, 1).equal(&alone), "rotary_dim {rotary_dim}, row {row} at {position}");
            }
        }
    }
}
