//! Free-space allocator: free extents of device blocks, in memory.
//!
//! Its persistent form is the set of blocks referenced by the block map in RocksDB: every
//! block not referenced there is free. That makes the allocator crash-consistent by
//! construction: blocks taken by a write that never committed are simply unreferenced after
//! a crash. [`Allocator::from_used`] rebuilds it at mount.

use std::collections::BTreeMap;

/// Free extents, start block → length. Never two adjacent extents (they are merged).
#[derive(Debug, Default)]
pub struct Allocator {
    free: BTreeMap<u64, u64>,
    free_blocks: u64,
}

/// A run of blocks `start..start+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

impl Allocator {
    /// All blocks in `first..end` are free except those in `used` (any order, no duplicates).
    pub fn from_used(first: u64, end: u64, mut used: Vec<u64>) -> Allocator {
        used.sort_unstable();
        let mut a = Allocator::default();
        let mut next = first;
        for u in used.into_iter().filter(|u| (first..end).contains(u)) {
            if u > next {
                a.insert(next, u - next);
            }
            next = next.max(u + 1);
        }
        if end > next {
            a.insert(next, end - next);
        }
        a
    }

    pub fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.free_blocks += len;
    }

    /// Takes `n` blocks: one contiguous extent when one is large enough (first fit), else
    /// as few pieces as the largest extents give. None (and nothing taken) if fewer than
    /// `n` blocks are free.
    pub fn alloc(&mut self, n: u64) -> Option<Vec<Extent>> {
        if n == 0 {
            return Some(Vec::new());
        }
        if n > self.free_blocks {
            return None;
        }
        if let Some((&start, &len)) = self.free.iter().find(|(_, l)| **l >= n) {
            self.take(start, len, n);
            return Some(vec![Extent { start, len: n }]);
        }
        let mut by_size: Vec<(u64, u64)> = self.free.iter().map(|(s, l)| (*s, *l)).collect();
        by_size.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        let mut need = n;
        for (start, len) in by_size {
            let take = len.min(need);
            self.take(start, len, take);
            out.push(Extent { start, len: take });
            need -= take;
            if need == 0 {
                break;
            }
        }
        out.sort_unstable_by_key(|e| e.start);
        Some(out)
    }

    fn take(&mut self, start: u64, len: u64, n: u64) {
        self.free.remove(&start);
        if len > n {
            self.free.insert(start + n, len - n);
        }
        self.free_blocks -= n;
    }

    /// Returns one block to the free space.
    pub fn free(&mut self, block: u64) {
        self.free_extent(Extent {
            start: block,
            len: 1,
        });
    }

    /// Returns an extent to the free space, merging with its neighbours.
    pub fn free_extent(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        debug_assert!(!self.overlaps(e), "double free of {e:?}");
        let mut start = e.start;
        let mut len = e.len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(e.start + e.len)) {
            self.free.remove(&(e.start + e.len));
            len += nl;
        }
        self.free.insert(start, len);
        self.free_blocks += e.len;
    }

    fn overlaps(&self, e: Extent) -> bool {
        self.free
            .range(..e.start + e.len)
            .next_back()
            .is_some_and(|(s, l)| s + l > e.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuild_alloc_free_merge() {
        let mut a = Allocator::from_used(1, 20, vec![5, 3, 4, 10]);
        assert_eq!(a.free_blocks(), 19 - 4);
        assert_eq!(a.alloc(2), Some(vec![Extent { start: 1, len: 2 }]));
        assert_eq!(a.alloc(5), Some(vec![Extent { start: 11, len: 5 }]));
        // 6..10 (4) and 16..20 (4) remain: 6 needs two pieces.
        let got = a.alloc(6).unwrap();
        assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), 6);
        assert_eq!(a.free_blocks(), 2);
        assert_eq!(a.alloc(3), None);
        for e in got {
            a.free_extent(e);
        }
        for b in [1, 2, 3, 4, 5, 10] {
            a.free(b);
        }
        a.free_extent(Extent { start: 11, len: 5 });
        assert_eq!(a.free_blocks(), 19);
        assert_eq!(a.free.len(), 1, "everything merged back: {:?}", a.free);
    }
}
