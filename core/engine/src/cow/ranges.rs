//! [`BlockRanges`]: a set of block numbers kept as disjoint ranges, for an overlay's zero
//! markers: zeroing or trimming a whole disk is one range, not a bit per block.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, non-adjacent half-open ranges of block numbers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct BlockRanges {
    /// start -> end (exclusive).
    ranges: BTreeMap<u64, u64>,
}

impl BlockRanges {
    /// Whether `block` is in the set.
    pub fn contains(&self, block: u64) -> bool {
        self.ranges
            .range(..=block)
            .next_back()
            .is_some_and(|(_, &end)| block < end)
    }

    /// Adds `range`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // A range starting before `start` that reaches it absorbs it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        // Every range starting inside the new one (or right at its end) is merged.
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            self.ranges.remove(&s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Removes one block, splitting the range that held it.
    pub fn remove(&mut self, block: u64) {
        let Some((&start, &end)) = self.ranges.range(..=block).next_back() else {
            return;
        };
        if block >= end {
            return;
        }
        self.ranges.remove(&start);
        if start < block {
            self.ranges.insert(start, block);
        }
        if block + 1 < end {
            self.ranges.insert(block + 1, end);
        }
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// Number of ranges (what a serialised set costs).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[Range<u64>]) -> BlockRanges {
        let mut set = BlockRanges::default();
        for r in ranges {
            set.insert(r.clone());
        }
        set
    }

    #[test]
    fn inserts_merge_overlapping_and_touching_ranges() {
        let mut s = set(&[10..20, 30..40]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..20, 30..40]);
        s.insert(20..30);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..40]);
        s.insert(5..12);
        s.insert(35..50);
        s.insert(60..61);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..50, 60..61]);
        s.insert(0..100);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..100]);
        s.insert(7..7);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn removing_a_block_splits_its_range() {
        let mut s = BlockRanges::default();
        s.insert(0..10);
        s.remove(0);
        s.remove(5);
        s.remove(9);
        s.remove(42);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![1..5, 6..9]);
        for (block, inside) in [
            (0, false),
            (1, true),
            (4, true),
            (5, false),
            (8, true),
            (9, false),
        ] {
            assert_eq!(s.contains(block), inside, "{block}");
        }
    }

    #[test]
    fn matches_a_plain_set_under_random_operations() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut ranges = BlockRanges::default();
        let mut plain = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let a = next() % 200;
            if next() % 3 == 0 {
                ranges.remove(a);
                plain.remove(&a);
            } else {
                let end = a + next() % 12;
                ranges.insert(a..end);
                plain.extend(a..end);
            }
        }
        for block in 0..220 {
            assert_eq!(ranges.contains(block), plain.contains(&block), "{block}");
        }
        let blocks: Vec<u64> = ranges.iter().flatten().collect();
        assert_eq!(blocks, plain.into_iter().collect::<Vec<_>>());
        let spans: Vec<Range<u64>> = ranges.iter().collect();
        assert!(
            spans.windows(2).all(|w| w[0].end < w[1].start),
            "disjoint, not touching"
        );
    }
}
