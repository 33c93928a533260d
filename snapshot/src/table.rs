//! The in-memory table of completed exceptions: origin chunk → COW chunk.
//!
//! Like dm-snapshot's in-memory table (`dm_consecutive_chunk_count` in `dm-snap.c`), it stores
//! *runs*: `len` consecutive origin chunks mapped to `len` consecutive COW chunks cost one entry.
//! Unlike Linux it allocates nothing after construction: entries come from a node pool whose
//! capacity (in runs) is fixed by the caller; when the pool is empty an insert fails with
//! [`TableFull`] and the engine treats the snapshot as overflowed.
//!
//! Layout: a power-of-two bucket array of `u32` heads, chained nodes of 20 bytes each (origin
//! chunk, COW chunk + run length, next), one node per run. A node's fields sit together, so a
//! probe touches the bucket and one node rather than three arrays. A run is chained in
//! the bucket of its first chunk (one run per bucket on average). Runs never cross an aligned
//! group of [`RUN_MAX`] origin chunks, so the run holding a chunk starts at most `RUN_MAX - 1`
//! chunks before it: a lookup tries the chunk itself (every run of a table filled at random),
//! then the group's first chunk (a sequential fill), then the starts in between.

use alloc::vec;
use alloc::vec::Vec;

/// log2 of the largest run, and of the group size runs stay within.
pub const GROUP_BITS: u32 = 3;
/// Longest run one entry can hold.
pub const RUN_MAX: u64 = 1 << GROUP_BITS;
const NIL: u32 = u32::MAX;
const LEN_SHIFT: u32 = 56;
const NEW_MASK: u64 = (1 << LEN_SHIFT) - 1;

/// The node pool is exhausted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFull;

/// A run of consecutive exceptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Run {
    /// First origin chunk.
    pub old_chunk: u64,
    /// First COW chunk.
    pub new_chunk: u64,
    /// Number of chunks (1..=RUN_MAX).
    pub len: u64,
}

/// One run's entry: its first origin chunk, its first COW chunk with the run length in the
/// top byte, and the next node of its chain (or of the free list). Stored as `u32` words so
/// the node is 20 bytes.
#[derive(Clone, Copy, Debug)]
struct Node {
    old: [u32; 2],
    new_len: [u32; 2],
    next: u32,
}

impl Node {
    const EMPTY: Node = Node {
        old: [0; 2],
        new_len: [0; 2],
        next: NIL,
    };

    fn old(&self) -> u64 {
        u64::from(self.old[0]) | (u64::from(self.old[1]) << 32)
    }

    fn new_len(&self) -> u64 {
        u64::from(self.new_len[0]) | (u64::from(self.new_len[1]) << 32)
    }

    fn set(&mut self, old: u64, new_len: u64) {
        self.old = [old as u32, (old >> 32) as u32];
        self.new_len = [new_len as u32, (new_len >> 32) as u32];
    }
}

const _: () = assert!(core::mem::size_of::<Node>() == ExceptionTable::NODE_BYTES);

/// Fixed-capacity run-compressed exception table.
#[derive(Clone, Debug)]
pub struct ExceptionTable {
    buckets: Vec<u32>,
    nodes: Vec<Node>,
    free: u32,
    runs: usize,
    exceptions: u64,
    bucket_bits: u32,
}

impl ExceptionTable {
    /// A table able to hold `max_runs` runs (at least 1; at most `u32::MAX - 1`).
    pub fn with_capacity(max_runs: usize) -> Self {
        let max_runs = max_runs.clamp(1, (u32::MAX - 1) as usize);
        let buckets = max_runs.next_power_of_two().max(16);
        let bucket_bits = buckets.trailing_zeros();
        let mut nodes = vec![Node::EMPTY; max_runs];
        for (i, n) in nodes.iter_mut().enumerate().take(max_runs - 1) {
            n.next = (i + 1) as u32;
        }
        ExceptionTable {
            buckets: vec![NIL; buckets],
            nodes,
            free: 0,
            runs: 0,
            exceptions: 0,
            bucket_bits,
        }
    }

    /// Capacity in runs.
    pub fn capacity(&self) -> usize {
        self.nodes.len()
    }

    /// Runs stored.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// Exceptions (chunks) stored.
    pub fn len(&self) -> u64 {
        self.exceptions
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.exceptions == 0
    }

    /// Free run entries left.
    pub fn free_runs(&self) -> usize {
        self.capacity() - self.runs
    }

    /// Bytes this table reserves (bucket array plus node pool).
    pub fn reserved_bytes(&self) -> usize {
        self.buckets.len() * 4 + self.capacity() * Self::NODE_BYTES
    }

    /// Bytes the stored runs need: `runs * 20` plus one bucket head per run slot in use.
    pub fn used_bytes(&self) -> usize {
        self.runs * (Self::NODE_BYTES + 4)
    }

    /// Bytes of one run entry.
    pub const NODE_BYTES: usize = 20;

    /// The bucket of runs that start at `start`.
    fn bucket(&self, start: u64) -> usize {
        (start.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.bucket_bits)) as usize
    }

    fn node(&self, i: u32) -> Run {
        let n = &self.nodes[i as usize];
        let new_len = n.new_len();
        Run {
            old_chunk: n.old(),
            new_chunk: new_len & NEW_MASK,
            len: (new_len >> LEN_SHIFT) + 1,
        }
    }

    fn set_node(&mut self, i: u32, run: Run) {
        self.nodes[i as usize].set(
            run.old_chunk,
            (run.new_chunk & NEW_MASK) | ((run.len - 1) << LEN_SHIFT),
        );
    }

    /// The run starting exactly at `start`: `(previous node in its chain, node)`.
    fn find_start(&self, start: u64) -> Option<(u32, u32)> {
        let mut prev = NIL;
        let mut i = self.buckets[self.bucket(start)];
        while i != NIL {
            let n = &self.nodes[i as usize];
            if n.old() == start {
                return Some((prev, i));
            }
            prev = i;
            i = n.next;
        }
        None
    }

    /// The run holding `chunk`: `(previous node in its chain, node)`. Runs start inside the
    /// group of `chunk` at or before it: `chunk` itself first (every run of a table filled at
    /// random), then the group's first chunk (runs of a sequential fill), then the rest.
    fn find_containing(&self, chunk: u64) -> Option<(u32, u32)> {
        let group_start = chunk & !(RUN_MAX - 1);
        let holds = |i: u32| {
            let r = self.node(i);
            chunk - r.old_chunk < r.len
        };
        if let Some(found) = self.find_start(chunk) {
            return Some(found);
        }
        if chunk != group_start {
            if let Some(found) = self.find_start(group_start) {
                if holds(found.1) {
                    return Some(found);
                }
            }
        }
        // Runs are disjoint: the first run found below `chunk` decides.
        let mut start = chunk;
        while start > group_start + 1 {
            start -= 1;
            if let Some(found) = self.find_start(start) {
                return holds(found.1).then_some(found);
            }
        }
        None
    }

    /// Takes node `i` (after `prev` in the chain of runs starting at `start`) off its chain.
    fn unlink(&mut self, start: u64, prev: u32, i: u32) {
        let next = self.nodes[i as usize].next;
        if prev == NIL {
            let b = self.bucket(start);
            self.buckets[b] = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
    }

    /// Puts node `i` on the chain of runs starting at its first chunk.
    fn link(&mut self, i: u32) {
        let b = self.bucket(self.nodes[i as usize].old());
        self.nodes[i as usize].next = self.buckets[b];
        self.buckets[b] = i;
    }

    /// Returns node `i` to the free list.
    fn release(&mut self, i: u32) {
        self.nodes[i as usize].next = self.free;
        self.free = i;
        self.runs -= 1;
    }

    /// The COW chunk holding origin chunk `old_chunk`, if any.
    pub fn lookup(&self, old_chunk: u64) -> Option<u64> {
        let (_, i) = self.find_containing(old_chunk)?;
        let r = self.node(i);
        Some(r.new_chunk + (old_chunk - r.old_chunk))
    }

    /// Whether inserting one more exception is guaranteed to succeed.
    pub fn can_insert(&self) -> bool {
        self.runs < self.capacity()
    }

    /// Adds `old_chunk → new_chunk`; merges with neighbouring runs. The caller guarantees
    /// `old_chunk` is not in the table and `new_chunk < 2^56`.
    pub fn insert(&mut self, old_chunk: u64, new_chunk: u64) -> Result<(), TableFull> {
        let first_in_group = old_chunk & (RUN_MAX - 1) == 0;
        let last_in_group = (old_chunk + 1) & (RUN_MAX - 1) == 0;
        // The run ending right before, COW-consecutive (same group).
        let before = if first_in_group {
            None
        } else {
            self.find_containing(old_chunk - 1).filter(|&(_, i)| {
                let r = self.node(i);
                r.old_chunk + r.len == old_chunk && r.new_chunk + r.len == new_chunk
            })
        };
        // The run starting right after, COW-consecutive (same group).
        let after = if last_in_group {
            None
        } else {
            self.find_start(old_chunk + 1)
                .filter(|&(_, i)| self.node(i).new_chunk == new_chunk.wrapping_add(1))
        };
        match (before, after) {
            (None, None) => {
                if self.free == NIL {
                    return Err(TableFull);
                }
                let n = self.free;
                self.free = self.nodes[n as usize].next;
                self.set_node(
                    n,
                    Run {
                        old_chunk,
                        new_chunk,
                        len: 1,
                    },
                );
                self.link(n);
                self.runs += 1;
            }
            (Some((_, a)), None) => {
                let mut r = self.node(a);
                r.len += 1;
                self.set_node(a, r);
            }
            (None, Some((prev, c))) => {
                // The run now starts one chunk earlier: it moves to that chunk's chain.
                self.unlink(old_chunk + 1, prev, c);
                let mut r = self.node(c);
                r.old_chunk -= 1;
                r.new_chunk -= 1;
                r.len += 1;
                self.set_node(c, r);
                self.link(c);
            }
            (Some((_, a)), Some((prev, c))) => {
                let mut r = self.node(a);
                r.len += 1 + self.node(c).len;
                self.set_node(a, r);
                self.unlink(old_chunk + 1, prev, c);
                self.release(c);
            }
        }
        self.exceptions += 1;
        Ok(())
    }

    /// Removes the exception of `old_chunk` (a merge gives chunks back). Returns `Ok(false)`
    /// if it was not in the table. Taking a chunk from the middle of a run splits the run
    /// and needs a free entry: `Err(TableFull)` if there is none (the table is unchanged).
    /// A merge takes records newest first, and records are in allocation order, so it
    /// takes chunks off the end of runs and never needs a split on stores written in order.
    pub fn remove(&mut self, old_chunk: u64) -> Result<bool, TableFull> {
        let Some((prev, i)) = self.find_containing(old_chunk) else {
            return Ok(false);
        };
        let r = self.node(i);
        let at = old_chunk - r.old_chunk;
        if r.len == 1 {
            self.unlink(r.old_chunk, prev, i);
            self.release(i);
        } else if at == 0 {
            // The run now starts one chunk later: it moves to that chunk's chain.
            self.unlink(r.old_chunk, prev, i);
            self.set_node(
                i,
                Run {
                    old_chunk: r.old_chunk + 1,
                    new_chunk: r.new_chunk + 1,
                    len: r.len - 1,
                },
            );
            self.link(i);
        } else if at == r.len - 1 {
            self.set_node(
                i,
                Run {
                    len: r.len - 1,
                    ..r
                },
            );
        } else {
            if self.free == NIL {
                return Err(TableFull);
            }
            let n = self.free;
            self.free = self.nodes[n as usize].next;
            self.set_node(i, Run { len: at, ..r });
            self.set_node(
                n,
                Run {
                    old_chunk: old_chunk + 1,
                    new_chunk: r.new_chunk + at + 1,
                    len: r.len - at - 1,
                },
            );
            self.link(n);
            self.runs += 1;
        }
        self.exceptions -= 1;
        Ok(true)
    }

    /// Every run, in no particular order.
    pub fn for_each_run(&self, mut f: impl FnMut(Run)) {
        for &head in &self.buckets {
            let mut i = head;
            while i != NIL {
                f(self.node(i));
                i = self.nodes[i as usize].next;
            }
        }
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        *self = Self::with_capacity(self.capacity());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn sequential_fill_is_compact() {
        let mut t = ExceptionTable::with_capacity(1024);
        for c in 0..4096u64 {
            t.insert(c, c + 2).unwrap();
        }
        assert_eq!(t.len(), 4096);
        assert_eq!(t.runs(), 4096 / RUN_MAX as usize);
        assert_eq!(t.lookup(4095), Some(4097));
        assert_eq!(t.lookup(4096), None);
        // 24 bytes per run of RUN_MAX: 3 bytes per exception (DESIGN: well under 16).
        assert!((t.used_bytes() as f64 / 4096.0) <= 24.0 / RUN_MAX as f64);
    }

    #[test]
    fn merges_both_sides() {
        let mut t = ExceptionTable::with_capacity(4);
        t.insert(10, 100).unwrap();
        t.insert(12, 102).unwrap();
        assert_eq!(t.runs(), 2);
        t.insert(11, 101).unwrap();
        assert_eq!(t.runs(), 1);
        for c in 10..13 {
            assert_eq!(t.lookup(c), Some(90 + c));
        }
        t.insert(31, 7).unwrap();
        t.insert(32, 8).unwrap(); // crosses a group boundary: separate run
        assert_eq!(t.runs(), 3);
        t.insert(0, 50).unwrap();
        assert_eq!(t.insert(5, 60), Err(TableFull));
        assert_eq!(t.lookup(5), None);
    }

    #[test]
    fn remove_from_ends_middle_and_single() {
        let mut t = ExceptionTable::with_capacity(2);
        for c in 0..5u64 {
            t.insert(c, 100 + c).unwrap();
        }
        t.insert(40, 7).unwrap();
        assert_eq!(t.runs(), 2);
        assert_eq!(t.remove(4), Ok(true));
        assert_eq!(t.remove(0), Ok(true));
        assert_eq!(t.remove(0), Ok(false));
        // Middle of 1..=3 needs a split, and the pool is empty.
        assert_eq!(t.remove(2), Err(TableFull));
        assert_eq!(t.len(), 4);
        assert_eq!(t.remove(40), Ok(true));
        assert_eq!(t.remove(2), Ok(true));
        assert_eq!(t.runs(), 2);
        assert_eq!(t.lookup(1), Some(101));
        assert_eq!(t.lookup(2), None);
        assert_eq!(t.lookup(3), Some(103));
        assert_eq!(t.remove(1), Ok(true));
        assert_eq!(t.remove(3), Ok(true));
        assert!(t.is_empty());
        assert_eq!(t.runs(), 0);
        t.insert(9, 9).unwrap();
        t.insert(10, 10).unwrap();
        assert_eq!(t.runs(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn removals_match_map(ops in proptest::collection::vec((0u64..100, any::<bool>()), 1..300)) {
            let mut t = ExceptionTable::with_capacity(400);
            let mut m = BTreeMap::new();
            let mut next_new = 2u64;
            for (old, ins) in ops {
                if ins && !m.contains_key(&old) {
                    next_new += 1;
                    t.insert(old, next_new).unwrap();
                    m.insert(old, next_new);
                } else if !ins {
                    prop_assert_eq!(t.remove(old), Ok(m.remove(&old).is_some()));
                }
            }
            prop_assert_eq!(t.len(), m.len() as u64);
            for old in 0..100u64 {
                prop_assert_eq!(t.lookup(old), m.get(&old).copied());
            }
            let mut n = 0;
            t.for_each_run(|_| n += 1);
            prop_assert_eq!(n, t.runs());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn table_matches_map(ops in proptest::collection::vec((0u64..300, 0u64..3), 1..400)) {
            let mut t = ExceptionTable::with_capacity(512);
            let mut m = BTreeMap::new();
            let mut next_new = 2u64;
            for (old, gap) in ops {
                if m.contains_key(&old) {
                    continue;
                }
                // Mostly consecutive COW allocation, sometimes with gaps.
                next_new += if gap == 0 { 2 } else { 1 };
                t.insert(old, next_new).unwrap();
                m.insert(old, next_new);
            }
            prop_assert_eq!(t.len(), m.len() as u64);
            for old in 0..310u64 {
                prop_assert_eq!(t.lookup(old), m.get(&old).copied());
            }
            // Runs are maximal within their group and consistent with the map.
            let mut runs = Vec::new();
            t.for_each_run(|r| runs.push(r));
            runs.sort();
            prop_assert_eq!(runs.len(), t.runs());
            let mut total = 0;
            for (k, r) in runs.iter().enumerate() {
                prop_assert!(r.len >= 1 && r.len <= RUN_MAX);
                prop_assert_eq!(r.old_chunk >> GROUP_BITS, (r.old_chunk + r.len - 1) >> GROUP_BITS);
                for j in 0..r.len {
                    prop_assert_eq!(m.get(&(r.old_chunk + j)), Some(&(r.new_chunk + j)));
                }
                if let Some(n) = runs.get(k + 1) {
                    let joinable = r.old_chunk + r.len == n.old_chunk
                        && r.new_chunk + r.len == n.new_chunk
                        && r.old_chunk >> GROUP_BITS == n.old_chunk >> GROUP_BITS;
                    prop_assert!(!joinable, "runs {:?} and {:?} should have merged", r, n);
                }
                total += r.len;
            }
            prop_assert_eq!(total, m.len() as u64);
        }
    }
}
