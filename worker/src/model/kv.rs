//! Key/value caches for incremental decoding: one sequence's (`KvCache`, grown by its own
//! forward passes), and several sequences decoding together (`BatchCache`), each row at its own
//! length, in preallocated tensors that a decode step writes in place.
//! Shapes: N rows, H cached heads (the key/value heads), T tokens, D = head dim.

use std::cell::OnceCell;

use tch::{Kind, Tensor};

/// Past keys and values per layer, (B, H, T_past, D) each, for one batch of equal-length rows.
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `l`'s keys and values (undefined tensors until its first pass writes them).
    pub(crate) fn layer(&mut self, l: usize) -> &mut (Tensor, Tensor) {
        while self.layers.len() <= l {
            self.layers.push((Tensor::new(), Tensor::new()));
        }
        &mut self.layers[l]
    }

    /// The first `len` tokens' keys and values (views), for a prompt that begins with them.
    pub fn prefix(&self, len: i64) -> Self {
        assert!(len <= self.len(), "a prefix of {len} tokens of a cache of {}", self.len());
        Self { layers: self.layers.iter().map(|(k, v)| (k.narrow(2, 0, len), v.narrow(2, 0, len))).collect() }
    }

    /// The cache repeated `n` times along the batch (n choices of one prompt).  (1, ..) -> (n, ..)
    pub fn repeat(&self, n: i64) -> Self {
        let rep = |t: &Tensor| t.repeat([n, 1, 1, 1]);
        Self { layers: self.layers.iter().map(|(k, v)| (rep(k), rep(v))).collect() }
    }
}

/// The caches of `rows()` sequences decoding in one batch: per layer, keys and values of shape
/// (N, H, capacity, D). Row i holds its sequence's first `lengths[i]` tokens; the columns past
/// them are unused, and a decode step masks them out.
pub struct BatchCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    lengths: Vec<i64>,
    capacity: i64,
    /// The model's context: no row grows past it.
    limit: i64,
}

impl BatchCache {
    pub fn new(limit: i64) -> Self {
        Self { layers: vec![], lengths: vec![], capacity: 0, limit }
    }

    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Tokens held by each row.
    pub fn lengths(&self) -> &[i64] {
        &self.lengths
    }

    /// Adds the rows of `cache` (all of its length) after the existing ones.
    pub fn push(&mut self, cache: &KvCache) {
        let (rows, len) = (cache.layers[0].0.size()[0], cache.len());
        self.reserve(len);
        let capacity = self.capacity;
        let padded = |t: &Tensor| {
            let (h, d) = (t.size()[1], t.size()[3]);
            let out = Tensor::zeros([rows, h, capacity, d], (t.kind(), t.device()));
            out.narrow(2, 0, len).copy_(t);
            out
        };
        if self.layers.is_empty() {
            self.layers = cache.layers.iter().map(|(k, v)| (padded(k), padded(v))).collect();
        } else {
            for ((k, v), (new_k, new_v)) in self.layers.iter_mut().zip(&cache.layers) {
                *k = Tensor::cat(&[&*k, &padded(new_k)], 0);
                *v = Tensor::cat(&[&*v, &padded(new_v)], 0);
            }
        }
        self.lengths.extend(std::iter::repeat_n(len, rows as usize));
    }

    /// Keeps the rows whose flag is true, in order.
    pub fn retain(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.rows(), "one flag per row");
        let kept: Vec<i64> = (0..keep.len() as i64).filter(|&i| keep[i as usize]).collect();
        if kept.is_empty() {
            *self = Self::new(self.limit);
            return;
        }
        if kept.len() < keep.len() {
            let index = Tensor::from_slice(&kept).to_device(self.layers[0].0.device());
            for (k, v) in &mut self.layers {
                *k = k.index_select(0, &index);
                *v = v.index_select(0, &index);
            }
            self.lengths = kept.iter().map(|&i| self.lengths[i as usize]).collect();
        }
    }

    /// Makes room for `len` tokens per row: capacity at least doubles, up to the context.
    pub(crate) fn reserve(&mut self, len: i64) {
        assert!(len <= self.limit, "a sequence of {len} tokens exceeds the context of {}", self.limit);
        if len <= self.capacity {
            return;
        }
        let capacity = len.max((2 * self.capacity).min(self.limit));
        for (k, v) in &mut self.layers {
            let grow = |t: &Tensor| {
                let (n, h, old, d) = t.size4().expect("(N, H, T, D)");
                let extra = Tensor::zeros([n, h, capacity - old, d], (t.kind(), t.device()));
                Tensor::cat(&[t, &extra], 2)
            };
            *k = grow(k);
            *v = grow(v);
        }
        self.capacity = capacity;
    }

    /// Records that every row took one more token.
    pub(crate) fn advance(&mut self) {
        self.lengths.iter_mut().for_each(|l| *l += 1);
    }

    /// What a decode step needs for rows at positions `lengths` (and makes room for it).
    pub(crate) fn step(&mut self) -> Step {
        let width = self.lengths.iter().max().map_or(0, |m| m + 1);
        self.reserve(width);
        let positions = Tensor::from_slice(&self.lengths).to_device(self.layers[0].0.device());
        Step { positions, mask: OnceCell::new(), width, attended: self.lengths.iter().map(|l| l + 1).collect() }
    }
}

/// A decode step's view of the batch: each row's new token goes at its position, and attends to
/// the positions before it and itself.
pub(crate) struct Step {
    /// Each row's position (its length before the step), (N,).
    pub positions: Tensor,
    /// W = the longest row's length after the step.
    pub width: i64,
    /// Positions each row attends to (its length after the step), on the host.
    pub attended: Vec<i64>,
    /// `mask()`, made on first use: the CPU attention (`attend.rs`) needs none.
    mask: OnceCell<Option<Tensor>>,
}

impl Step {
    /// Over the first `width` columns (true: attend), (N, 1, 1, W); none when every row has the
    /// same length (all W columns are then attended; libtorch's masked kernel is slower).
    pub fn mask(&self) -> Option<&Tensor> {
        self.mask
            .get_or_init(|| {
                let ragged = self.attended.iter().any(|&a| a != self.attended[0]);
                let (n, w) = (self.attended.len() as i64, self.width);
                let columns = Tensor::arange(w, (Kind::Int64, self.positions.device())).view([1, w]);
                ragged.then(|| columns.le_tensor(&self.positions.view([n, 1])).view([n, 1, 1, w]))
            })
            .as_ref()
    }
}
