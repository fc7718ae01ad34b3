//! CodeGen's fused `qkv_proj` -> GPT-J's separate q, k, v projections. CodeGen views the 3E
//! outputs as [mp_num=4, 3E/4] and splits each chunk into (query, value, key), E/4 rows each; so
//! row j of chunk c goes to row c*E/4 + j of q, v or k (docs/formats.md, CodeGen -> HF GPT-J).

use zerotune_hf::MP_NUM;

/// Splits `qkv` ([3E, E] row-major, `elem` bytes per value) into (q, k, v), each [E, E].
pub fn split_qkv(qkv: &[u8], e: usize, elem: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    assert_eq!(qkv.len(), 3 * e * e * elem, "qkv_proj must be [3E, E]");
    assert_eq!(e % MP_NUM, 0, "n_embd must be divisible by {MP_NUM}");
    let row = e * elem;
    let local = e / MP_NUM;
    let (mut q, mut k, mut v) = (Vec::with_capacity(e * row), Vec::with_capacity(e * row), Vec::with_capacity(e * row));
    for chunk in qkv.chunks_exact(3 * local * row) {
        let (query, rest) = chunk.split_at(local * row);
        let (value, key) = rest.split_at(local * row);
        q.extend_from_slice(query);
        v.extend_from_slice(value);
        k.extend_from_slice(key);
    }
    (q, k, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-built: E = 4, so each chunk holds one row each of q, v, k (rows numbered 0..12).
    #[test]
    fn golden_unpermutation() {
        let e = 4;
        let rows: Vec<u8> = (0..12u8).flat_map(|r| [r; 4]).collect();
        let (q, k, v) = split_qkv(&rows, e, 1);
        let firsts = |m: &[u8]| m.chunks(4).map(|r| r[0]).collect::<Vec<_>>();
        // fauxpilot's block permutation [0,3,6,9 | 1,4,7,10 | 2,5,8,11] split into (q, v, k).
        assert_eq!(firsts(&q), [0, 3, 6, 9]);
        assert_eq!(firsts(&v), [1, 4, 7, 10]);
        assert_eq!(firsts(&k), [2, 5, 8, 11]);
    }

    #[test]
    fn row_formula_for_e_8() {
        let e = 8;
        let elem = 2;
        let qkv: Vec<u8> = (0..3 * e).flat_map(|r| vec![r as u8; e * elem]).collect();
        let (q, k, v) = split_qkv(&qkv, e, elem);
        let local = e / 4;
        for c in 0..4 {
            for j in 0..local {
                let at = |m: &[u8]| m[(c * local + j) * e * elem];
                assert_eq!(at(&q) as usize, c * 3 * local + j);
                assert_eq!(at(&v) as usize, c * 3 * local + local + j);
                assert_eq!(at(&k) as usize, c * 3 * local + 2 * local + j);
            }
        }
    }
}
