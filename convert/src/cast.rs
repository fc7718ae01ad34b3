//! Float tensors as little-endian bytes: casts between fp32/fp16/bf16 (round to nearest even, as
//! torch does) fused with the transposes FasterTransformer wants, in one pass that writes into a
//! caller-owned buffer (reused across tensors, so large outputs are not re-faulted each time).

use zerotune_hf::Dtype;

/// One float format of `N` bytes.
trait Float<const N: usize> {
    fn decode(bytes: [u8; N]) -> f32;
    fn encode(value: f32) -> [u8; N];
}

struct F64;
struct F32;
struct F16;
struct Bf16;

impl Float<8> for F64 {
    fn decode(bytes: [u8; 8]) -> f32 {
        f64::from_le_bytes(bytes) as f32
    }
    fn encode(value: f32) -> [u8; 8] {
        f64::from(value).to_le_bytes()
    }
}

impl Float<4> for F32 {
    fn decode(bytes: [u8; 4]) -> f32 {
        f32::from_le_bytes(bytes)
    }
    fn encode(value: f32) -> [u8; 4] {
        value.to_le_bytes()
    }
}

impl Float<2> for F16 {
    fn decode(bytes: [u8; 2]) -> f32 {
        half::f16::from_le_bytes(bytes).to_f32()
    }
    fn encode(value: f32) -> [u8; 2] {
        half::f16::from_f32(value).to_le_bytes()
    }
}

impl Float<2> for Bf16 {
    fn decode(bytes: [u8; 2]) -> f32 {
        half::bf16::from_le_bytes(bytes).to_f32()
    }
    fn encode(value: f32) -> [u8; 2] {
        half::bf16::from_f32(value).to_le_bytes()
    }
}

/// A [rows, cols] row-major source matrix written into `dst` transposed, each source element
/// (r, c) landing at element `c * ld + offset + r` of `dst`. A plain transpose has ld = rows and
/// offset 0; a larger ld interleaves several matrices (FT's [in, 3, out] qkv).
#[derive(Clone, Copy)]
pub struct Transpose {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub offset: usize,
}

impl Transpose {
    pub fn plain(rows: usize, cols: usize) -> Self {
        Self { rows, cols, ld: rows, offset: 0 }
    }
}

macro_rules! dispatch {
    ($from:expr, $to:expr, $f:ident ( $($arg:expr),* )) => {
        match ($from, $to) {
            (Dtype::F32, Dtype::F32) => $f::<4, 4, F32, F32>($($arg),*),
            (Dtype::F32, Dtype::F16) => $f::<4, 2, F32, F16>($($arg),*),
            (Dtype::F32, Dtype::Bf16) => $f::<4, 2, F32, Bf16>($($arg),*),
            (Dtype::F16, Dtype::F32) => $f::<2, 4, F16, F32>($($arg),*),
            (Dtype::F16, Dtype::F16) => $f::<2, 2, F16, F16>($($arg),*),
            (Dtype::F16, Dtype::Bf16) => $f::<2, 2, F16, Bf16>($($arg),*),
            (Dtype::Bf16, Dtype::F32) => $f::<2, 4, Bf16, F32>($($arg),*),
            (Dtype::Bf16, Dtype::F16) => $f::<2, 2, Bf16, F16>($($arg),*),
            (Dtype::Bf16, Dtype::Bf16) => $f::<2, 2, Bf16, Bf16>($($arg),*),
            (Dtype::F64, Dtype::F32) => $f::<8, 4, F64, F32>($($arg),*),
            (Dtype::F64, Dtype::F16) => $f::<8, 2, F64, F16>($($arg),*),
            (Dtype::F64, Dtype::Bf16) => $f::<8, 2, F64, Bf16>($($arg),*),
            (from, to) => panic!("cannot convert {from:?} weights to {to:?} (float dtypes are checked on open)"),
        }
    };
}

/// Replaces `dst` with `src` (in `from`) cast to `to`; a plain copy when they are the same.
pub fn cast_into(dst: &mut Vec<u8>, src: &[u8], from: Dtype, to: Dtype) {
    dst.clear();
    if from == to {
        dst.extend_from_slice(src);
        return;
    }
    dst.resize(src.len() / from.size() * to.size(), 0);
    dispatch!(from, to, cast_typed(dst, src));
}

fn cast_typed<const A: usize, const B: usize, S: Float<A>, D: Float<B>>(dst: &mut [u8], src: &[u8]) {
    let (src, _) = src.as_chunks::<A>();
    let (dst, _) = dst.as_chunks_mut::<B>();
    for (d, s) in dst.iter_mut().zip(src) {
        *d = D::encode(S::decode(*s));
    }
}

/// Writes the transpose of `src` ([t.rows, t.cols] in `from`) into `dst` (in `to`) per `t`.
pub fn transpose_into(dst: &mut [u8], src: &[u8], t: Transpose, from: Dtype, to: Dtype) {
    assert_eq!(src.len(), t.rows * t.cols * from.size(), "matrix bytes do not match its shape");
    assert!((t.cols - 1) * t.ld + t.offset + t.rows <= dst.len() / to.size(), "transpose target too small");
    dispatch!(from, to, transpose_typed(dst, src, t));
}

fn transpose_typed<const A: usize, const B: usize, S: Float<A>, D: Float<B>>(dst: &mut [u8], src: &[u8], t: Transpose) {
    const TILE: usize = 32;
    let (src, _) = src.as_chunks::<A>();
    let (dst, _) = dst.as_chunks_mut::<B>();
    for r0 in (0..t.rows).step_by(TILE) {
        for c0 in (0..t.cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(t.cols) {
                let out = &mut dst[c * t.ld + t.offset..];
                for r in r0..(r0 + TILE).min(t.rows) {
                    out[r] = D::encode(S::decode(src[r * t.cols + c]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    #[test]
    fn transpose_moves_every_element() {
        let (rows, cols) = (37, 70); // not multiples of the tile
        let m: Vec<u8> = (0..rows * cols).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut t = vec![0u8; m.len()];
        transpose_into(&mut t, &m, Transpose::plain(rows, cols), Dtype::F32, Dtype::F32);
        let values = f32s(&t);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(values[c * rows + r] as usize, r * cols + c);
            }
        }
    }

    #[test]
    fn interleaved_transpose_with_cast() {
        // Two 2x3 fp16 matrices into one [3, 2 (which), 2] fp32 target.
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let b: Vec<u8> = [7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let mut dst = vec![0u8; 12 * 4];
        for (which, m) in [&a, &b].iter().enumerate() {
            transpose_into(&mut dst, m, Transpose { rows: 2, cols: 3, ld: 4, offset: which * 2 }, Dtype::F16, Dtype::F32);
        }
        assert_eq!(f32s(&dst), [1.0, 4.0, 7.0, 10.0, 2.0, 5.0, 8.0, 11.0, 3.0, 6.0, 9.0, 12.0]);
    }

    #[test]
    fn casts_round_to_nearest_even() {
        let src: Vec<u8> = [1.0f32 + 1.0 / 4096.0, -65504.0, 0.1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut half_bytes = vec![];
        cast_into(&mut half_bytes, &src, Dtype::F32, Dtype::F16);
        let back: Vec<f32> = half_bytes.chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        assert_eq!(back, [1.0, -65504.0, half::f16::from_f32(0.1).to_f32()]);
    }
}
