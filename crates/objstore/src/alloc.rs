//! Free-space allocator: free extents of device blocks, in memory.
//!
//! Its persistent form is the set of blocks referenced by the block map in RocksDB: every
//! block not referenced there is free. That makes the allocator crash-consistent by
//! construction: blocks taken by a write that never committed are simply unreferenced after
//! a crash. [`Allocator::from_used`] rebuilds it at mount.
//!
//! A free of blocks that are free already (a double free) is refused, release builds
//! included: put in the free map twice, a block would be handed out to two objects. The
//! free map is left as it was and the allocator allocates nothing more (see
//! [`Allocator::failure`]); reopening the store rebuilds it from the block map.

use std::collections::{BTreeMap, BTreeSet};

/// Free extents, indexed by start (to merge neighbours) and by length (to find a fit in
/// O(log n): copy-on-write leaves tens of thousands of one-block holes on a busy device,
/// and a scan of them per allocation once cost more than the write itself).
#[derive(Debug, Default)]
pub struct Allocator {
    /// start block → length. Never two adjacent extents (they are merged).
    free: BTreeMap<u64, u64>,
    /// (length, start) of every extent in `free`.
    by_len: BTreeSet<(u64, u64)>,
    /// Free blocks reserved for small allocations, handed out in order (see
    /// [`Allocator::alloc_small`]); not in `free`, but counted in `free_blocks`.
    run: Option<Extent>,
    free_blocks: u64,
    /// The first free refused: the block map and this map disagree, so nothing is
    /// allocated any more (a block the map holds as free may still be in use).
    failed: Option<AllocError>,
}

/// A free the allocator refused; its free map is as it was before.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Some of the blocks are free already (or reserved for small allocations).
    #[error("double free of {len} blocks from block {start}: some of them are free already")]
    DoubleFree { start: u64, len: u64 },
}

/// Blocks reserved at a time for small allocations: 1 MiB.
pub const SMALL_RUN_BLOCKS: u64 = 256;

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

    /// The first free refused, if any. From then on [`Allocator::alloc`] and
    /// [`Allocator::alloc_small`] give nothing: the free map is known to disagree with the
    /// block map, and handing out a block the block map still names would corrupt data.
    pub fn failure(&self) -> Option<&AllocError> {
        self.failed.as_ref()
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
        self.free_blocks += len;
    }

    fn remove(&mut self, start: u64, len: u64) {
        self.free.remove(&start);
        self.by_len.remove(&(len, start));
        self.free_blocks -= len;
    }

    /// Takes `n` blocks: the smallest extent that holds them all (best fit, so large
    /// extents stay whole for large writes), else as few pieces as the largest extents
    /// give. None (and nothing taken) if fewer than `n` blocks are free, or after a
    /// refused free ([`Allocator::failure`]).
    pub fn alloc(&mut self, n: u64) -> Option<Vec<Extent>> {
        if n == 0 {
            return Some(Vec::new());
        }
        if n > self.free_blocks || self.failed.is_some() {
            return None;
        }
        if n > self.free_blocks - self.run.map_or(0, |r| r.len) {
            self.return_run();
            if self.failed.is_some() {
                return None;
            }
        }
        if let Some(&(len, start)) = self.by_len.range((n, 0)..).next() {
            self.take(start, len, n);
            return Some(vec![Extent { start, len: n }]);
        }
        let mut out = Vec::new();
        let mut need = n;
        while need > 0 {
            let &(len, start) = self.by_len.iter().next_back()?;
            let take = len.min(need);
            self.take(start, len, take);
            out.push(Extent { start, len: take });
            need -= take;
        }
        out.sort_unstable_by_key(|e| e.start);
        Some(out)
    }

    /// Takes `n` blocks for a small write: the next ones of a reserved run, so that small
    /// writes made one after another sit side by side on the device (their deferred
    /// device writes then merge into few large ones) instead of each filling some
    /// one-block hole that copy-on-write left. A new run is the smallest free extent of
    /// [`SMALL_RUN_BLOCKS`] or more; without one, this is [`Allocator::alloc`].
    pub fn alloc_small(&mut self, n: u64) -> Option<Vec<Extent>> {
        if self.failed.is_some() {
            return None;
        }
        if let Some(r) = self.run.as_mut() {
            if r.len >= n {
                let got = Extent {
                    start: r.start,
                    len: n,
                };
                r.start += n;
                r.len -= n;
                self.free_blocks -= n;
                if r.len == 0 {
                    self.run = None;
                }
                return Some(vec![got]);
            }
        }
        // The rest of the old run goes back first (it may merge with the extent chosen).
        self.return_run();
        let Some(&(len, start)) = self.by_len.range((SMALL_RUN_BLOCKS.max(n), 0)..).next() else {
            return self.alloc(n);
        };
        let take = SMALL_RUN_BLOCKS.max(n);
        self.take(start, len, take);
        self.free_blocks += take;
        self.run = Some(Extent { start, len: take });
        self.alloc_small(n)
    }

    /// Gives the rest of the reserved run back to the free extents.
    fn return_run(&mut self) {
        if let Some(r) = self.run.take() {
            self.free_blocks -= r.len;
            if let Err(e) = self.free_extent(r) {
                // The run overlaps free extents: this map is damaged. The run's blocks
                // stay out of it (unused until the next mount rebuilds the map), and
                // nothing is allocated any more.
                tracing::error!("the allocator's reserved run is free already: {e}");
            }
        }
    }

    /// Takes the first `n` blocks of the free extent `start..start+len`.
    fn take(&mut self, start: u64, len: u64, n: u64) {
        self.remove(start, len);
        if len > n {
            self.insert(start + n, len - n);
        }
    }

    /// Returns one block to the free space (see [`Allocator::free_extent`]).
    pub fn free(&mut self, block: u64) -> Result<(), AllocError> {
        self.free_extent(Extent {
            start: block,
            len: 1,
        })
    }

    /// Returns an extent to the free space, merging with its neighbours. Refuses, leaving
    /// the free map as it was, if any of its blocks is free already: from then on nothing
    /// is allocated ([`Allocator::failure`]).
    pub fn free_extent(&mut self, e: Extent) -> Result<(), AllocError> {
        if e.len == 0 {
            return Ok(());
        }
        // Checked in every build: this is what keeps one block from two objects.
        self.check_in_use(e)?;
        let mut start = e.start;
        let mut len = e.len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.remove(ps, pl);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(e.start + e.len)) {
            self.remove(e.start + e.len, nl);
            len += nl;
        }
        self.insert(start, len);
        Ok(())
    }

    /// Checks that no block of `e` is free, as [`Allocator::free_extent`] does: a store
    /// checks the blocks a commit will free before it sends the commit, so that a commit
    /// that would free blocks twice is refused before anything changes. A refusal stops
    /// allocation likewise.
    pub fn check_in_use(&mut self, e: Extent) -> Result<(), AllocError> {
        if e.len == 0 || !self.overlaps(e) {
            return Ok(());
        }
        let err = AllocError::DoubleFree {
            start: e.start,
            len: e.len,
        };
        self.failed.get_or_insert_with(|| err.clone());
        Err(err)
    }

    fn overlaps(&self, e: Extent) -> bool {
        let in_run = self
            .run
            .is_some_and(|r| r.start < e.start + e.len && e.start < r.start + r.len);
        in_run
            || self
                .free
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
            a.free_extent(e).expect("free");
        }
        for b in [1, 2, 3, 4, 5, 10] {
            a.free(b).expect("free");
        }
        a.free_extent(Extent { start: 11, len: 5 }).expect("free");
        assert_eq!(a.free_blocks(), 19);
        assert_eq!(a.free.len(), 1, "everything merged back: {:?}", a.free);
    }

    /// Random allocations and frees against a bitmap: no block is handed out twice, the
    /// counts agree, and the two indexes describe the same extents, all merged.
    #[test]
    fn matches_a_bitmap_under_random_use() {
        let (first, end) = (1u64, 4000u64);
        let mut a = Allocator::from_used(first, end, vec![]);
        let mut used = vec![false; end as usize];
        let mut held: Vec<Extent> = Vec::new();
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..20_000 {
            if rnd(3) > 0 || held.is_empty() {
                let n = if rnd(4) == 0 { 1 + rnd(300) } else { 1 };
                let got = if rnd(2) == 0 {
                    a.alloc_small(n)
                } else {
                    a.alloc(n)
                };
                let Some(got) = got else {
                    assert!(a.free_blocks() < n);
                    continue;
                };
                assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), n);
                for e in got {
                    for b in e.start..e.start + e.len {
                        assert!(
                            (first..end).contains(&b) && !used[b as usize],
                            "block {b} twice"
                        );
                        used[b as usize] = true;
                    }
                    held.push(e);
                }
            } else {
                let e = held.swap_remove(rnd(held.len() as u64) as usize);
                for b in e.start..e.start + e.len {
                    used[b as usize] = false;
                }
                a.free_extent(e).expect("free");
            }
            let in_use = used.iter().filter(|u| **u).count() as u64;
            assert_eq!(a.free_blocks(), end - first - in_use);
        }
        let mapped: u64 = a.free.values().sum();
        assert_eq!(a.free_blocks(), mapped + a.run.map_or(0, |r| r.len));
        a.return_run();
        assert_eq!(a.free.len(), a.by_len.len());
        let mut prev_end = None;
        for (&s, &l) in &a.free {
            assert!(a.by_len.contains(&(l, s)));
            assert_ne!(prev_end, Some(s), "adjacent extents not merged");
            prev_end = Some(s + l);
        }
    }

    /// D10: a double free (whole, partial, or of blocks in the reserved run) is refused in
    /// every build, leaves the free map as it was, and stops allocation: no block can be
    /// handed out twice. (It was a `debug_assert!`: in release builds the block went into
    /// the free map a second time.)
    #[test]
    fn a_double_free_is_refused_and_leaves_the_free_map_unchanged() {
        // Used: 10, 11, 12 and 20. A small allocation takes 21 and reserves 22..277.
        let mut a = Allocator::from_used(1, 1000, vec![10, 11, 12, 20]);
        let small = a.alloc_small(1).expect("small");
        let run = a.run.expect("a reserved run");
        let state = |a: &Allocator| (a.free.clone(), a.by_len.clone(), a.free_blocks, a.run);
        let before = state(&a);
        let cases = [
            Extent { start: 3, len: 2 },  // free
            Extent { start: 12, len: 2 }, // 12 used, 13 free
            Extent { start: 9, len: 2 },  // 9 free, 10 used
            Extent {
                start: run.start,
                len: 1,
            }, // reserved for small allocations
        ];
        for e in cases {
            assert_eq!(
                a.free_extent(e),
                Err(AllocError::DoubleFree {
                    start: e.start,
                    len: e.len
                }),
                "{e:?}"
            );
            assert_eq!(state(&a), before, "{e:?} changed the free map");
        }
        assert_eq!(
            a.failure(),
            Some(&AllocError::DoubleFree { start: 3, len: 2 }),
            "the first refusal is kept"
        );
        assert_eq!(a.alloc(1), None, "nothing is allocated after a double free");
        assert_eq!(a.alloc_small(1), None);
        assert_eq!(state(&a), before);
        // Freeing blocks that were in use is still taken: the refusal changed nothing else.
        a.free_extent(small[0]).expect("a block in use");
        a.free(10).expect("a block in use");
    }

    /// Small allocations made one after another are adjacent, even where copy-on-write
    /// left one-block holes that best fit would fill first; large ones still use best fit.
    #[test]
    fn small_allocations_are_taken_side_by_side() {
        // Holes at 2, 4, 6 and one large extent from 10.
        let mut a = Allocator::from_used(1, 2000, vec![1, 3, 5, 7, 8, 9]);
        let first = a.alloc_small(1).unwrap()[0];
        assert_eq!(
            first.start, 10,
            "a run is carved from a large extent, not a hole"
        );
        for i in 1..5 {
            assert_eq!(
                a.alloc_small(1).unwrap(),
                vec![Extent {
                    start: 10 + i,
                    len: 1
                }]
            );
        }
        assert_eq!(
            a.alloc_small(3).unwrap(),
            vec![Extent { start: 15, len: 3 }]
        );
        assert_eq!(
            a.alloc(1).unwrap(),
            vec![Extent { start: 2, len: 1 }],
            "best fit"
        );
        // Everything left, run included, can still be allocated at once.
        let left = a.free_blocks();
        let all = a.alloc(left).unwrap();
        assert_eq!(all.iter().map(|e| e.len).sum::<u64>(), left);
        assert_eq!(a.free_blocks(), 0);
        assert_eq!(a.alloc_small(1), None);
    }
}
