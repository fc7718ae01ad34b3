//! The ZeRO shard map: the flat parameter buffer padded so that each of the `world` ranks owns an
//! equal, aligned, contiguous partition `[r * P, (r + 1) * P)` (cutting through tensors), the
//! padding past `numel` owned by nobody. Plain data, pure functions.

use std::ops::Range;

use crate::optim::adamw::Segment;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardMap {
    pub numel: usize,
    pub world: usize,
    /// Elements per partition, P.
    pub partition: usize,
}

impl ShardMap {
    pub fn new(numel: usize, world: usize) -> Self {
        assert!(world > 0, "world size must be positive");
        let partition = zerotune_proto::plan::zero_partition(numel, world);
        Self { numel, world, partition }
    }

    /// Length of the padded flat buffer: world x P.
    pub fn padded(&self) -> usize {
        self.partition * self.world
    }

    /// The real (unpadded) elements rank `rank` owns; empty for ranks wholly in the padding.
    pub fn range(&self, rank: usize) -> Range<usize> {
        let start = (rank * self.partition).min(self.numel);
        start..((rank + 1) * self.partition).min(self.numel)
    }

    /// `segments` (over the whole flat buffer) cut to `range` and made relative to its start.
    pub fn clip(segments: &[Segment], range: &Range<usize>) -> Vec<Segment> {
        segments
            .iter()
            .filter_map(|s| {
                let (start, end) = (s.start.max(range.start), s.end.min(range.end));
                (start < end).then(|| Segment { start: start - range.start, end: end - range.start, decay: s.decay })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use zerotune_proto::plan::PARTITION_ALIGN;

    use super::*;

    #[test]
    fn partitions_are_equal_aligned_and_cover_everything_once() {
        for numel in [1, 127, 128, 129, 1000, 12_345, 356_712_448] {
            for world in 1..=9 {
                let map = ShardMap::new(numel, world);
                assert_eq!(map.partition % PARTITION_ALIGN, 0);
                assert!(map.padded() >= numel && map.padded() - numel < world * PARTITION_ALIGN + world, "{numel} {world}: little padding");
                let mut next = 0;
                for rank in 0..world {
                    let r = map.range(rank);
                    assert_eq!(r.start, next.min(numel).max(r.start));
                    assert!(r.len() <= map.partition);
                    if r.start < numel {
                        assert_eq!(r.start, rank * map.partition, "partition r starts at r x P");
                    }
                    next = r.end;
                }
                assert_eq!(next, numel, "{numel} over {world}: the ranges tile [0, numel)");
            }
        }
    }

    #[test]
    fn segments_are_clipped_and_rebased() {
        let segs = [
            Segment { start: 0, end: 100, decay: true },
            Segment { start: 100, end: 130, decay: false },
            Segment { start: 130, end: 300, decay: true },
        ];
        let map = ShardMap::new(300, 3); // P = 128
        assert_eq!(
            ShardMap::clip(&segs, &map.range(0)),
            [Segment { start: 0, end: 100, decay: true }, Segment { start: 100, end: 128, decay: false }]
        );
        assert_eq!(
            ShardMap::clip(&segs, &map.range(1)),
            [Segment { start: 0, end: 2, decay: false }, Segment { start: 2, end: 128, decay: true }]
        );
        assert_eq!(ShardMap::clip(&segs, &map.range(2)), [Segment { start: 0, end: 44, decay: true }]);
    }
}
