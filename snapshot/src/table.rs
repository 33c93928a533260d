//! The in-memory table of completed exceptions: origin chunk → COW chunk.
//!
//! Like dm-snapshot's in-memory table (`dm_consecutive_chunk_count` in `dm-snap.c`), it stores
//! *runs*: `len` consecutive origin chunks mapped to `len` consecutive COW chunks cost one entry.
//!
//! Sizing: a table has a *limit* (the most runs it may ever hold: the store's data chunks) and
//! grows towards it as it fills, the way dm-snapshot allocates one exception at a time.
//! Entries come from segments of [`SEGMENT_RUNS`] nodes (16 KiB); a new segment is allocated
//! only when the free list is empty, with a fallible reservation (`try_reserve`): when the heap
//! cannot serve it, the growth fails with [`Grow::NoMemory`] instead of panicking, and the
//! caller treats it as dm-snapshot treats `-ENOMEM` in `pending_complete()` (the snapshot is
//! invalidated; a store being loaded is refused). The engine grows the table *before* it
//! allocates a COW chunk ([`ExceptionTable::make_room`] from its `reserve`), so a commit never
//! allocates and never finds the pool empty. Segments are never moved or copied: growth costs
//! one 16 KiB allocation per 1024 runs, plus a rehash of the bucket array each time the node
//! count passes twice the bucket count (amortised O(1) per insert; a failed bucket growth only
//! makes chains longer). Nothing is reserved for the worst case, so a store costs memory in
//! proportion to what it holds: 16 bytes a run plus 2 to 4 bytes of bucket array, i.e. 18 to
//! 20 bytes per exception for a table filled at random and under 3 for a sequential fill.
//!
//! A store being loaded builds its table with a [`TableBuilder`] instead: every record's run
//! is appended in order (segments grow the same way), and the bucket array is sized once for
//! the nodes there are before they are linked, so a large store's load pays for no rehash.
//!
//! Layout: a power-of-two bucket array of `u32` heads (one per two nodes), chained nodes of 16
//! bytes each (origin chunk, COW chunk and run length packed in 96 bits, next), one node per
//! run. Runs never cross an aligned *group* of [`RUN_MAX`] origin chunks, and every run of a
//! group is chained in the bucket of that group: a lookup, an insert (which finds the runs it
//! extends) and a removal walk one chain, with no further probe. Chunk numbers are below
//! [`CHUNK_LIMIT`] (2^46: 32 PiB of 512-byte chunks); a run beyond it is refused like a full
//! table.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Test-only fault injection: while set, every segment growth fails as if the heap were
/// exhausted ([`Grow::NoMemory`]). Process-wide: set it only in a test binary of its own.
#[doc(hidden)]
pub static FAIL_GROWTH: AtomicBool = AtomicBool::new(false);

/// Heap allocations made by table growth since start (segments, the segment list, bucket
/// arrays), so a caller that checks its I/O path for allocations can tell them apart.
static GROWTH_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Heap allocations every table has made to grow, since start.
pub fn growth_allocations() -> u64 {
    GROWTH_ALLOCATIONS.load(Ordering::Relaxed)
}

fn count_growth() {
    GROWTH_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
}

/// log2 of the largest run, and of the group size runs stay within.
pub const GROUP_BITS: u32 = 3;
/// Longest run one entry can hold.
pub const RUN_MAX: u64 = 1 << GROUP_BITS;
/// Origin and COW chunk numbers a table holds are below this (46 bits each in a node).
pub const CHUNK_LIMIT: u64 = 1 << CHUNK_BITS;
const CHUNK_BITS: u32 = 46;
const CHUNK_MASK: u128 = (1 << CHUNK_BITS) - 1;
const NIL: u32 = u32::MAX;
/// Most nodes a table may hold (node indexes are `u32`, `NIL` aside).
const MAX_NODES: usize = (u32::MAX - 1) as usize;

/// The table cannot take another run: it holds its limit, or growing it failed (see
/// [`ExceptionTable::out_of_memory`]), or a chunk number is not below [`CHUNK_LIMIT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFull;

/// Why [`ExceptionTable::make_room`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grow {
    /// The table would pass its limit (more runs than the store has chunks).
    Full,
    /// The heap could not serve the next segment.
    NoMemory,
}

/// Nodes per segment (a segment is 16 KiB).
pub const SEGMENT_RUNS: usize = 1024;

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

/// One run's entry: 96 bits of payload (origin chunk in bits 0..46, COW chunk in 46..92,
/// length - 1 in 92..95) and the next node of its chain (or of the free list): 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Node {
    lo: u64,
    hi: u32,
    next: u32,
}

impl Node {
    const EMPTY: Node = Node {
        lo: 0,
        hi: 0,
        next: NIL,
    };

    fn payload(&self) -> u128 {
        u128::from(self.lo) | (u128::from(self.hi) << 64)
    }

    fn old(&self) -> u64 {
        (self.payload() & CHUNK_MASK) as u64
    }

    fn run(&self) -> Run {
        let p = self.payload();
        Run {
            old_chunk: (p & CHUNK_MASK) as u64,
            new_chunk: ((p >> CHUNK_BITS) & CHUNK_MASK) as u64,
            len: ((p >> (2 * CHUNK_BITS)) & 7) as u64 + 1,
        }
    }

    /// Stores `run` (its chunks below [`CHUNK_LIMIT`], its length 1..=8).
    fn set(&mut self, run: Run) {
        let p = u128::from(run.old_chunk) & CHUNK_MASK
            | (u128::from(run.new_chunk) & CHUNK_MASK) << CHUNK_BITS
            | u128::from((run.len - 1) & 7) << (2 * CHUNK_BITS);
        self.lo = p as u64;
        self.hi = (p >> 64) as u32;
    }
}

const _: () = assert!(core::mem::size_of::<Node>() == ExceptionTable::NODE_BYTES);

/// What one walk of a group's chain found for an origin chunk.
#[derive(Clone, Copy)]
struct Probe {
    /// The run holding the chunk: (previous node in the chain, node).
    holding: Option<(u32, u32)>,
    /// The run ending right before the chunk.
    before: Option<u32>,
    /// The run starting right after the chunk: (previous node in the chain, node).
    after: Option<(u32, u32)>,
}

/// Run-compressed exception table that grows up to a limit.
#[derive(Clone, Debug)]
pub struct ExceptionTable {
    buckets: Vec<u32>,
    /// Node segments: every one but the last holds [`SEGMENT_RUNS`] nodes.
    segments: Vec<Vec<Node>>,
    /// Nodes in all segments.
    allocated: usize,
    /// Most runs the table may hold.
    limit: usize,
    free: u32,
    runs: usize,
    exceptions: u64,
    bucket_bits: u32,
    /// A growth failed for want of memory.
    out_of_memory: bool,
}

impl ExceptionTable {
    /// An empty table that may grow to `limit` runs (at least 1; at most `u32::MAX - 1`).
    /// Allocates only a small bucket array: nodes come as runs are added.
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, MAX_NODES);
        ExceptionTable {
            buckets: vec![NIL; 16],
            segments: Vec::new(),
            allocated: 0,
            limit,
            free: NIL,
            runs: 0,
            exceptions: 0,
            bucket_bits: 4,
            out_of_memory: false,
        }
    }

    /// A table with all `max_runs` nodes allocated up front (tools and tests; the limit is
    /// `max_runs` too). When the heap cannot serve that, the table grows later as usual.
    pub fn with_capacity(max_runs: usize) -> Self {
        let mut t = Self::new(max_runs);
        let limit = t.limit;
        let _ = t.make_room(limit);
        t.out_of_memory = false;
        t
    }

    /// The most runs this table may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Raises the most runs this table may hold (its store grew). Nothing is allocated.
    pub fn raise_limit(&mut self, limit: usize) {
        self.limit = self.limit.max(limit.min(MAX_NODES));
    }

    /// Whether a growth failed because the heap could not serve it.
    pub fn out_of_memory(&self) -> bool {
        self.out_of_memory
    }

    /// Makes sure `n` more runs can be added without allocating: grows the node pool by
    /// segments (fallibly) and the bucket array with it. `Err(Grow::Full)` when the runs would
    /// pass the limit, `Err(Grow::NoMemory)` when the heap cannot serve a segment (the table
    /// is unchanged but for segments already added, which stay usable).
    pub fn make_room(&mut self, n: usize) -> Result<(), Grow> {
        let want = self.runs.checked_add(n).ok_or(Grow::Full)?;
        if want > self.limit {
            return Err(Grow::Full);
        }
        while self.allocated < want {
            if let Err(e) = self.add_segment() {
                self.out_of_memory = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Adds one segment of nodes to the free list, and grows the bucket array with it.
    fn add_segment(&mut self) -> Result<(), Grow> {
        self.add_nodes()?;
        // One bucket per two nodes: chains of one or two runs on average.
        if self.allocated > 2 * self.buckets.len() {
            self.rehash(self.allocated.div_ceil(2).next_power_of_two());
        }
        Ok(())
    }

    /// Adds one segment of nodes to the free list (the bucket array is left as it is).
    fn add_nodes(&mut self) -> Result<(), Grow> {
        let size = SEGMENT_RUNS.min(self.limit - self.allocated);
        if size == 0 {
            return Err(Grow::Full);
        }
        if FAIL_GROWTH.load(Ordering::Relaxed) {
            return Err(Grow::NoMemory);
        }
        let mut seg: Vec<Node> = Vec::new();
        seg.try_reserve_exact(size).map_err(|_| Grow::NoMemory)?;
        count_growth();
        let list = self.segments.capacity();
        self.segments.try_reserve(1).map_err(|_| Grow::NoMemory)?;
        if self.segments.capacity() != list {
            count_growth();
        }
        let first = self.allocated as u32;
        seg.resize(size, Node::EMPTY);
        // Chain the new nodes in front of the free list (lowest index first).
        for (k, n) in seg.iter_mut().enumerate() {
            n.next = if k + 1 < size {
                first + k as u32 + 1
            } else {
                self.free
            };
        }
        self.segments.push(seg);
        self.free = first;
        self.allocated += size;
        Ok(())
    }

    /// Rebuilds the bucket array with `count` buckets (a power of two). A failed allocation
    /// leaves the old array: chains get longer, lookups stay right.
    fn rehash(&mut self, count: usize) {
        let mut buckets: Vec<u32> = Vec::new();
        if buckets.try_reserve_exact(count).is_err() {
            return;
        }
        count_growth();
        buckets.resize(count, NIL);
        let old = core::mem::replace(&mut self.buckets, buckets);
        self.bucket_bits = count.trailing_zeros();
        for head in old {
            let mut i = head;
            while i != NIL {
                let next = self.at(i).next;
                self.link(i);
                i = next;
            }
        }
    }

    fn at(&self, i: u32) -> &Node {
        let i = i as usize;
        &self.segments[i / SEGMENT_RUNS][i % SEGMENT_RUNS]
    }

    fn at_mut(&mut self, i: u32) -> &mut Node {
        let i = i as usize;
        &mut self.segments[i / SEGMENT_RUNS][i % SEGMENT_RUNS]
    }

    /// Takes a node off the free list, growing the pool if it is empty.
    fn take_free(&mut self) -> Result<u32, TableFull> {
        if self.free == NIL && self.make_room(1).is_err() {
            return Err(TableFull);
        }
        let n = self.free;
        if n == NIL {
            return Err(TableFull);
        }
        self.free = self.at(n).next;
        Ok(n)
    }

    /// Nodes allocated so far (runs the table holds without growing).
    pub fn capacity(&self) -> usize {
        self.allocated
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

    /// Runs that may still be added before the limit (some may need the table to grow).
    pub fn free_runs(&self) -> usize {
        self.limit - self.runs
    }

    /// Bytes this table has allocated (bucket array plus node segments).
    pub fn reserved_bytes(&self) -> usize {
        self.buckets.len() * 4 + self.capacity() * Self::NODE_BYTES
    }

    /// Bytes the stored runs need: a 16-byte node each plus a 4-byte bucket head per two.
    pub fn used_bytes(&self) -> usize {
        self.runs * (Self::NODE_BYTES + 2)
    }

    /// Bytes of one run entry.
    pub const NODE_BYTES: usize = 16;

    /// The bucket of the runs of the group holding `chunk`.
    fn bucket(&self, chunk: u64) -> usize {
        ((chunk >> GROUP_BITS).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.bucket_bits))
            as usize
    }

    /// Walks the chain of `chunk`'s group once: the run holding it, the run ending right
    /// before it and the run starting right after it (both in the group).
    fn probe(&self, chunk: u64) -> Probe {
        let group = chunk >> GROUP_BITS;
        let mut found = Probe {
            holding: None,
            before: None,
            after: None,
        };
        let mut prev = NIL;
        let mut i = self.buckets[self.bucket(chunk)];
        while i != NIL {
            let n = self.at(i);
            let old = n.old();
            if old >> GROUP_BITS == group {
                let r = n.run();
                if chunk >= old && chunk - old < r.len {
                    found.holding = Some((prev, i));
                    return found;
                }
                if old + r.len == chunk {
                    found.before = Some(i);
                } else if old == chunk + 1 {
                    found.after = Some((prev, i));
                }
            }
            prev = i;
            i = n.next;
        }
        found
    }

    fn node(&self, i: u32) -> Run {
        self.at(i).run()
    }

    fn set_node(&mut self, i: u32, run: Run) {
        self.at_mut(i).set(run);
    }

    /// Takes node `i` (after `prev` in the chain of the group holding `chunk`) off its chain.
    fn unlink(&mut self, chunk: u64, prev: u32, i: u32) {
        let next = self.at(i).next;
        if prev == NIL {
            let b = self.bucket(chunk);
            self.buckets[b] = next;
        } else {
            self.at_mut(prev).next = next;
        }
    }

    /// Puts node `i` on the chain of its group.
    fn link(&mut self, i: u32) {
        let b = self.bucket(self.at(i).old());
        self.at_mut(i).next = self.buckets[b];
        self.buckets[b] = i;
    }

    /// Returns node `i` to the free list.
    fn release(&mut self, i: u32) {
        self.at_mut(i).next = self.free;
        self.free = i;
        self.runs -= 1;
    }

    /// The COW chunk holding origin chunk `old_chunk`, if any.
    pub fn lookup(&self, old_chunk: u64) -> Option<u64> {
        let (_, i) = self.probe(old_chunk).holding?;
        let r = self.node(i);
        Some(r.new_chunk + (old_chunk - r.old_chunk))
    }

    /// Whether inserting one more exception succeeds without allocating.
    pub fn can_insert(&self) -> bool {
        self.free != NIL
    }

    /// Adds `old_chunk → new_chunk`; merges with neighbouring runs. The caller guarantees
    /// `old_chunk` is not in the table (see [`insert_new`](Self::insert_new)). Chunk numbers
    /// not below [`CHUNK_LIMIT`] are refused (`TableFull`).
    pub fn insert(&mut self, old_chunk: u64, new_chunk: u64) -> Result<(), TableFull> {
        self.insert_new(old_chunk, new_chunk).map(|_| ())
    }

    /// Adds `old_chunk → new_chunk` unless `old_chunk` is in the table already (`Ok(false)`,
    /// nothing changed): one walk of a chain does both (the store loader's check for records
    /// naming one origin chunk twice).
    pub fn insert_new(&mut self, old_chunk: u64, new_chunk: u64) -> Result<bool, TableFull> {
        if old_chunk >= CHUNK_LIMIT || new_chunk >= CHUNK_LIMIT {
            return Err(TableFull);
        }
        let found = self.probe(old_chunk);
        if found.holding.is_some() {
            return Ok(false);
        }
        // Only COW-consecutive neighbours join.
        let before = found.before.filter(|&a| {
            let r = self.node(a);
            r.new_chunk + r.len == new_chunk
        });
        let after = found
            .after
            .filter(|&(_, c)| self.node(c).new_chunk == new_chunk.wrapping_add(1));
        match (before, after) {
            (None, None) => {
                let n = self.take_free()?;
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
            (Some(a), None) => {
                let mut r = self.node(a);
                r.len += 1;
                self.set_node(a, r);
            }
            (None, Some((_, c))) => {
                // The run now starts one chunk earlier, in the same group (same chain).
                let mut r = self.node(c);
                r.old_chunk -= 1;
                r.new_chunk -= 1;
                r.len += 1;
                self.set_node(c, r);
            }
            (Some(a), Some((prev, c))) => {
                let mut r = self.node(a);
                r.len += 1 + self.node(c).len;
                self.set_node(a, r);
                // `prev` may be `a` itself: its link is untouched by the update above.
                self.unlink(old_chunk, prev, c);
                self.release(c);
            }
        }
        self.exceptions += 1;
        Ok(true)
    }

    /// Removes the exception of `old_chunk` (a merge gives chunks back). Returns `Ok(false)`
    /// if it was not in the table. Taking a chunk from the middle of a run splits the run
    /// and needs a free entry: `Err(TableFull)` if there is none (the table is unchanged).
    /// A merge takes records newest first, and records are in allocation order, so it
    /// takes chunks off the end of runs and never needs a split on stores written in order.
    pub fn remove(&mut self, old_chunk: u64) -> Result<bool, TableFull> {
        let Some((prev, i)) = self.probe(old_chunk).holding else {
            return Ok(false);
        };
        let r = self.node(i);
        let at = old_chunk - r.old_chunk;
        if r.len == 1 {
            self.unlink(old_chunk, prev, i);
            self.release(i);
        } else if at == 0 {
            // The run now starts one chunk later, in the same group (same chain).
            self.set_node(
                i,
                Run {
                    old_chunk: r.old_chunk + 1,
                    new_chunk: r.new_chunk + 1,
                    len: r.len - 1,
                },
            );
        } else if at == r.len - 1 {
            self.set_node(
                i,
                Run {
                    len: r.len - 1,
                    ..r
                },
            );
        } else {
            let n = self.take_free()?;
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
                i = self.at(i).next;
            }
        }
    }

    /// Removes everything (and gives the memory back).
    pub fn clear(&mut self) {
        *self = Self::new(self.limit);
    }
}

/// Two runs built by a [`TableBuilder`] name the same origin chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DuplicateChunk {
    /// An origin chunk both runs hold.
    pub old_chunk: u64,
}

/// A table built from a whole store's records at load time, in two passes instead of one
/// [`insert_new`](ExceptionTable::insert_new) each.
///
/// [`push`](Self::push) only appends: a record that extends the run pushed last (the next
/// origin chunk and the next COW chunk, in the same group, on either side) lengthens it,
/// any other takes the next node, in order, from segments that grow as with inserts
/// (fallibly, [`Grow::NoMemory`]). Nothing is hashed and no chain is walked, so appending
/// touches memory in order. [`finish`](Self::finish) then sizes the bucket array once for the
/// nodes there are (one per two, as growth keeps it) and links the nodes in order, walking
/// each one's chain as an insert does: runs that overlap one already linked are a
/// [`DuplicateChunk`], runs that continue one (before or after, COW chunks too) join it. The
/// table is the one inserting the records one by one would give (the same runs, each as long
/// as its group and its records allow), without the rehashes of a bucket array that doubles
/// while it fills, which cost a large store's load as much as its inserts: each walks every
/// chain, and at ten million runs the nodes are spread over 160 MB.
#[derive(Debug)]
pub struct TableBuilder {
    table: ExceptionTable,
    /// Nodes appended so far: they are nodes `0..appended`, in the order pushed.
    appended: u32,
    /// Nodes appended per part of the bucket array (`part`).
    parts: [u32; PARTS],
}

/// log2 of the parts of the bucket array a large built table's nodes are sorted by before
/// they are linked ([`TableBuilder::finish`]).
const PART_BITS: u32 = 6;
const PARTS: usize = 1 << PART_BITS;
/// Fewer nodes than this are linked in the order pushed: they fit a cache, sorting gains
/// nothing.
const PART_MIN_NODES: u32 = 1 << 16;

/// The part of the bucket array holding the chain of `chunk`'s group, for a bucket array of
/// at least [`PARTS`] buckets: the top bits of [`ExceptionTable::bucket`] (the same hash).
fn part(chunk: u64) -> usize {
    ((chunk >> GROUP_BITS).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - PART_BITS)) as usize
}

impl TableBuilder {
    /// An empty builder for a table that may hold `limit` runs (see [`ExceptionTable::new`]).
    pub fn new(limit: usize) -> Self {
        TableBuilder {
            table: ExceptionTable::new(limit),
            appended: 0,
            parts: [0; PARTS],
        }
    }

    /// Exceptions (records) pushed so far.
    pub fn len(&self) -> u64 {
        self.table.exceptions
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.table.exceptions == 0
    }

    /// Whether a growth failed because the heap could not serve it.
    pub fn out_of_memory(&self) -> bool {
        self.table.out_of_memory
    }

    /// Appends `old_chunk → new_chunk`. `Err(Grow::Full)` when it needs a run past the
    /// table's limit or a chunk number is not below [`CHUNK_LIMIT`]; `Err(Grow::NoMemory)`
    /// when the heap cannot serve the next segment. Duplicates are found by
    /// [`finish`](Self::finish).
    pub fn push(&mut self, old_chunk: u64, new_chunk: u64) -> Result<(), Grow> {
        if old_chunk >= CHUNK_LIMIT || new_chunk >= CHUNK_LIMIT {
            return Err(Grow::Full);
        }
        let t = &mut self.table;
        if let Some(last) = self.appended.checked_sub(1) {
            let r = t.node(last);
            if r.old_chunk >> GROUP_BITS == old_chunk >> GROUP_BITS {
                if r.old_chunk + r.len == old_chunk && r.new_chunk + r.len == new_chunk {
                    t.set_node(
                        last,
                        Run {
                            len: r.len + 1,
                            ..r
                        },
                    );
                    t.exceptions += 1;
                    return Ok(());
                }
                if old_chunk + 1 == r.old_chunk && new_chunk.wrapping_add(1) == r.new_chunk {
                    t.set_node(
                        last,
                        Run {
                            old_chunk,
                            new_chunk,
                            len: r.len + 1,
                        },
                    );
                    t.exceptions += 1;
                    return Ok(());
                }
            }
        }
        if t.free == NIL {
            if let Err(e) = t.add_nodes() {
                if e == Grow::NoMemory {
                    t.out_of_memory = true;
                }
                return Err(e);
            }
        }
        // A fresh table's free list is its nodes in order, and nothing is released before
        // `finish`: the node taken is node `appended`.
        let n = t.free;
        debug_assert_eq!(n, self.appended);
        t.free = t.at(n).next;
        t.set_node(
            n,
            Run {
                old_chunk,
                new_chunk,
                len: 1,
            },
        );
        t.runs += 1;
        t.exceptions += 1;
        self.appended += 1;
        // A run joined on push stays in its group: same hash, same part.
        self.parts[part(old_chunk)] += 1;
        Ok(())
    }

    /// Links every run pushed and returns the table, or a chunk two runs hold. The bucket
    /// array is allocated once, fallibly: when the heap cannot serve it, a smaller one is
    /// tried (chains get longer; lookups stay right).
    ///
    /// A large table's nodes are first sorted in place by the part of the bucket array their
    /// chain is in (64 parts; each run is moved once, along its cycle), then linked
    /// part by part: the chain and bucket a run is linked into are then within one part of
    /// the nodes and of the bucket array, not anywhere in them, so linking ten million runs
    /// touches a few MB at a time instead of 190 MB at random (measured under TCG, where each
    /// page missed costs a software TLB fill: 64 parts cut the load's CPU time by a quarter,
    /// 16 parts did not pay for their sort, 128 gained nothing more).
    pub fn finish(mut self) -> Result<ExceptionTable, DuplicateChunk> {
        let n = self.appended;
        let mut t = self.table;
        let mut count = t.allocated.div_ceil(2).next_power_of_two();
        while count > t.buckets.len() {
            // Nothing is linked yet: the rehash only replaces the empty array.
            t.rehash(count);
            if t.buckets.len() == count {
                break;
            }
            count /= 2;
        }
        if n >= PART_MIN_NODES && t.buckets.len() >= PARTS {
            t.sort_by_part(n, &mut self.parts);
        }
        for i in 0..n {
            t.link_appended(i)?;
        }
        Ok(t)
    }
}

impl ExceptionTable {
    /// Sorts nodes `0..n` (unlinked: only their runs matter) by [`part`], given how many
    /// of them each part has: an in-place distribution (American flag sort), each run read
    /// and written once.
    fn sort_by_part(&mut self, n: u32, counts: &mut [u32; PARTS]) {
        // `counts` becomes each part's next place, `ends` its end.
        let mut ends = [0u32; PARTS];
        let mut at = 0u32;
        for (c, end) in counts.iter_mut().zip(ends.iter_mut()) {
            let len = *c;
            *c = at;
            at += len;
            *end = at;
        }
        debug_assert_eq!(at, n);
        for p in 0..PARTS {
            while counts[p] < ends[p] {
                // Carry the run found at part `p`'s next place along its cycle until one
                // that belongs there comes back.
                let home = counts[p];
                let mut carried = self.node(home);
                let mut q = part(carried.old_chunk);
                while q != p {
                    let to = counts[q];
                    counts[q] += 1;
                    let there = self.node(to);
                    self.set_node(to, carried);
                    carried = there;
                    q = part(carried.old_chunk);
                }
                self.set_node(home, carried);
                counts[p] += 1;
            }
        }
    }

    /// Links node `i`, which holds a run and is on no chain (see [`TableBuilder`]): joins it to
    /// the runs it continues, or puts it on its group's chain.
    fn link_appended(&mut self, i: u32) -> Result<(), DuplicateChunk> {
        let r = self.node(i);
        let group = r.old_chunk >> GROUP_BITS;
        let end = r.old_chunk + r.len;
        let mut before = None;
        let mut after = None;
        let mut prev = NIL;
        let mut j = self.buckets[self.bucket(r.old_chunk)];
        while j != NIL {
            let n = self.at(j);
            let next = n.next;
            if n.old() >> GROUP_BITS == group {
                let q = n.run();
                let q_end = q.old_chunk + q.len;
                if q.old_chunk < end && r.old_chunk < q_end {
                    return Err(DuplicateChunk {
                        old_chunk: q.old_chunk.max(r.old_chunk),
                    });
                }
                if q_end == r.old_chunk && q.new_chunk + q.len == r.new_chunk {
                    before = Some(j);
                } else if end == q.old_chunk && r.new_chunk + r.len == q.new_chunk {
                    after = Some((prev, j));
                }
            }
            prev = j;
            j = next;
        }
        match (before, after) {
            (None, None) => self.link(i),
            (Some(a), None) => {
                let q = self.node(a);
                self.set_node(
                    a,
                    Run {
                        len: q.len + r.len,
                        ..q
                    },
                );
                self.release(i);
            }
            (None, Some((_, c))) => {
                // The run now starts earlier, in the same group (same chain).
                let q = self.node(c);
                self.set_node(
                    c,
                    Run {
                        len: q.len + r.len,
                        ..r
                    },
                );
                self.release(i);
            }
            (Some(a), Some((p, c))) => {
                let q = self.node(a);
                let len = q.len + r.len + self.node(c).len;
                self.set_node(a, Run { len, ..q });
                // `p` may be `a` itself: its link is untouched by the update above.
                self.unlink(r.old_chunk, p, c);
                self.release(c);
                self.release(i);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn sequential_fill_is_compact() {
        let mut t = ExceptionTable::with_capacity(512);
        for c in 0..4096u64 {
            t.insert(c, c + 2).unwrap();
        }
        assert_eq!(t.len(), 4096);
        assert_eq!(t.runs(), 4096 / RUN_MAX as usize);
        assert_eq!(t.lookup(4095), Some(4097));
        assert_eq!(t.lookup(4096), None);
        // 18 bytes per run of RUN_MAX: 2.25 bytes per exception.
        assert!((t.used_bytes() as f64 / 4096.0) <= 2.25);
        assert!((t.reserved_bytes() as f64 / 4096.0) <= 2.5);
    }

    /// Issue 17's memory targets, at a million exceptions: at most 24 bytes per exception
    /// for a random fill (one run each) and 4 for a sequential one, everything the table
    /// allocated counted (nodes, free nodes of the last segment, the bucket array).
    #[test]
    fn a_million_exceptions_fit_the_memory_targets() {
        const N: u64 = 1_000_000;
        let origin_chunks = 1u64 << 29; // a 2 TiB origin of 4 KiB chunks
        for (random, target) in [(true, 24.0), (false, 4.0)] {
            let mut t = ExceptionTable::new(usize::MAX);
            for i in 0..N {
                let old = if random {
                    // A bijection of the origin's chunks: consecutive exceptions far apart.
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (origin_chunks - 1)
                } else {
                    i
                };
                assert_eq!(t.insert_new(old, 2 + i + i / 256), Ok(true));
            }
            assert_eq!(t.len(), N);
            let per = t.reserved_bytes() as f64 / N as f64;
            assert!(
                per <= target,
                "random {random}: {per:.2} bytes per exception"
            );
            assert_eq!(t.lookup(0), Some(2));
            assert_eq!(t.insert_new(0, 7), Ok(false), "a duplicate is refused");
        }
    }

    #[test]
    fn chunks_past_the_limit_are_refused_not_truncated() {
        let mut t = ExceptionTable::new(16);
        assert_eq!(t.insert(CHUNK_LIMIT, 2), Err(TableFull));
        assert_eq!(t.insert(3, CHUNK_LIMIT), Err(TableFull));
        t.insert(CHUNK_LIMIT - 1, CHUNK_LIMIT - 1).unwrap();
        assert_eq!(t.lookup(CHUNK_LIMIT - 1), Some(CHUNK_LIMIT - 1));
        assert_eq!(t.lookup((CHUNK_LIMIT - 1) & !(RUN_MAX - 1)), None);
        assert_eq!(t.len(), 1);
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

    /// Every run of `t`, sorted.
    fn runs_of(t: &ExceptionTable) -> Vec<Run> {
        let mut runs = Vec::new();
        t.for_each_run(|r| runs.push(r));
        runs.sort();
        runs
    }

    /// The table inserts give, or the first origin chunk named twice.
    fn inserted(records: &[(u64, u64)], limit: usize) -> Result<ExceptionTable, u64> {
        let mut t = ExceptionTable::new(limit);
        for &(old, new) in records {
            if !t.insert_new(old, new).unwrap() {
                return Err(old);
            }
        }
        Ok(t)
    }

    fn built(records: &[(u64, u64)], limit: usize) -> Result<ExceptionTable, DuplicateChunk> {
        let mut b = TableBuilder::new(limit);
        for &(old, new) in records {
            b.push(old, new).unwrap();
        }
        assert_eq!(b.len(), records.len() as u64);
        b.finish()
    }

    /// Issue 17's memory targets hold for a table built at load time too, and its bucket
    /// array is the size growth would have given it, allocated once.
    #[test]
    fn a_built_table_fits_the_memory_targets() {
        const N: u64 = 1_000_000;
        let origin_chunks = 1u64 << 29;
        for (random, target) in [(true, 24.0), (false, 4.0)] {
            let old_of = |i: u64| {
                if random {
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (origin_chunks - 1)
                } else {
                    i
                }
            };
            let mut b = TableBuilder::new(usize::MAX);
            for i in 0..N {
                b.push(old_of(i), 2 + i + i / 256).unwrap();
            }
            let t = b.finish().unwrap();
            assert_eq!(t.len(), N);
            assert_eq!(t.runs(), if random { N } else { N / RUN_MAX } as usize);
            assert_eq!(
                t.buckets.len(),
                t.capacity().div_ceil(2).next_power_of_two()
            );
            let per = t.reserved_bytes() as f64 / N as f64;
            assert!(
                per <= target,
                "random {random}: {per:.2} bytes per exception"
            );
            for i in [0, 1, 255, 256, N / 2, N - 1] {
                assert_eq!(t.lookup(old_of(i)), Some(2 + i + i / 256));
            }
        }
    }

    /// Runs that continue each other join when linked whatever the order of their records,
    /// and overlaps hidden inside runs are found.
    #[test]
    fn building_joins_runs_pushed_apart_and_finds_hidden_duplicates() {
        // 0 and 2 first, 1 last: one run; 7 before 6 (pushed backwards): one run.
        let t = built(&[(0, 2), (2, 4), (6, 9), (5, 8), (1, 3), (7, 10)], 16).unwrap();
        assert_eq!(
            runs_of(&t),
            vec![
                Run {
                    old_chunk: 0,
                    new_chunk: 2,
                    len: 3
                },
                Run {
                    old_chunk: 5,
                    new_chunk: 8,
                    len: 3
                }
            ]
        );
        // Joined on both sides, with the run after it first on the chain.
        let t = built(&[(3, 5), (1, 3), (2, 4)], 16).unwrap();
        assert_eq!(t.runs(), 1);
        assert_eq!(t.lookup(1), Some(3));
        assert_eq!(t.lookup(3), Some(5));
        // Not COW-consecutive, or across a group: no join.
        assert_eq!(built(&[(0, 2), (1, 4)], 16).unwrap().runs(), 2);
        assert_eq!(built(&[(7, 2), (8, 3)], 16).unwrap().runs(), 2);
        // A chunk named again once its run has grown past it, and one inside a run.
        assert_eq!(
            built(&[(0, 2), (1, 3), (0, 9)], 16).unwrap_err(),
            DuplicateChunk { old_chunk: 0 }
        );
        assert_eq!(
            built(
                &[(4, 20), (0, 2), (1, 3), (2, 4), (3, 5), (5, 21), (2, 30)],
                16
            )
            .unwrap_err(),
            DuplicateChunk { old_chunk: 2 }
        );
        // Past the limit, or past the chunk numbers a node holds: refused when pushed.
        let mut b = TableBuilder::new(2);
        b.push(0, 2).unwrap();
        b.push(1, 3).unwrap(); // joins: still one run
        b.push(9, 4).unwrap();
        assert_eq!(b.push(20, 5), Err(Grow::Full));
        assert!(!b.out_of_memory());
        assert_eq!(b.push(CHUNK_LIMIT, 6), Err(Grow::Full));
        assert_eq!(b.push(21, CHUNK_LIMIT), Err(Grow::Full));
        let t = b.finish().unwrap();
        assert_eq!((t.len(), t.runs()), (3, 2));
        // An empty builder gives an empty table that grows as usual.
        let mut t = TableBuilder::new(100).finish().unwrap();
        assert!(t.is_empty());
        t.insert(5, 5).unwrap();
        assert_eq!(t.lookup(5), Some(5));
    }

    /// The parts a built table is sorted by are the top bits of the bucket of every size
    /// that has that many buckets.
    #[test]
    fn parts_are_the_top_bits_of_buckets() {
        let mut t = ExceptionTable::new(16);
        for bits in PART_BITS..=30 {
            t.bucket_bits = bits;
            for c in (0..5000u64).map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 18) {
                assert_eq!(
                    part(c),
                    t.bucket(c) >> (bits - PART_BITS),
                    "bits {bits} chunk {c}"
                );
            }
        }
    }

    /// A table large enough to be sorted by parts before it is linked is still the table
    /// inserting gives, joins (records of a run pushed apart, out of COW order) and
    /// duplicates included.
    #[test]
    fn a_large_built_table_is_sorted_then_linked_like_inserts() {
        let n = 3 * PART_MIN_NODES as u64;
        let mut records: Vec<(u64, u64)> = (0..n)
            .map(|i| {
                (
                    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) & !1,
                    2 + 2 * i,
                )
            })
            .collect();
        // Every 64th record's run gets its neighbour (old + 1, new + 1) far later.
        for i in (0..n as usize).step_by(64) {
            let (old, new) = records[i];
            records.push((old + 1, new + 1));
        }
        let origin: std::collections::BTreeSet<u64> = records.iter().map(|r| r.0).collect();
        assert_eq!(
            origin.len(),
            records.len(),
            "test records name distinct chunks"
        );
        let a = inserted(&records, records.len()).unwrap();
        let b = built(&records, records.len()).unwrap();
        assert_eq!(b.runs(), n as usize);
        assert_eq!(runs_of(&a), runs_of(&b));
        for &(old, new) in records.iter().step_by(97) {
            assert_eq!(b.lookup(old), Some(new));
        }
        // One chunk named again, inside a joined run.
        let (old, _) = records[64 * 100];
        records.push((old + 1, 2 * n + 1000));
        assert_eq!(
            built(&records, records.len()).unwrap_err(),
            DuplicateChunk { old_chunk: old + 1 }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// A built table is the table inserting the same records one by one gives: the same
        /// runs, and the same verdict on origin chunks named twice.
        #[test]
        fn building_matches_inserting(
            ops in proptest::collection::vec((0u64..200, 0u64..4, 0u64..4), 1..400),
            dup_at in proptest::option::of(0usize..400),
        ) {
            let mut records: Vec<(u64, u64)> = Vec::new();
            let mut next_new = 2u64;
            let mut seen = std::collections::BTreeSet::new();
            for (old, gap, swap) in ops {
                if !seen.insert(old) {
                    continue;
                }
                // Mostly consecutive COW allocation, sometimes with gaps; origin chunks in
                // any order (often neighbours, so runs form in both directions); now and
                // then a record committed before the one allocated ahead of it.
                next_new += if gap == 0 { 3 } else { 1 };
                records.push((old, next_new));
                let n = records.len();
                if swap == 0 && n >= 2 {
                    records.swap(n - 1, n - 2);
                }
            }
            if let Some(at) = dup_at.filter(|&at| at < records.len()) {
                // One origin chunk named again, with a fresh COW chunk.
                let old = records[at].0;
                records.push((old, next_new + 1));
            }
            let limit = records.len();
            match (inserted(&records, limit), built(&records, limit)) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(runs_of(&a), runs_of(&b));
                    prop_assert_eq!((a.len(), a.runs()), (b.len(), b.runs()));
                    for old in 0..210u64 {
                        prop_assert_eq!(a.lookup(old), b.lookup(old));
                    }
                }
                (Err(a), Err(b)) => prop_assert_eq!(a, b.old_chunk),
                (a, b) => prop_assert!(false, "inserted {:?}, built {:?}", a.map(|t| t.len()), b.map(|t| t.len())),
            }
        }
    }

    #[test]
    fn grows_by_segments_up_to_its_limit() {
        let mut t = ExceptionTable::new(3 * SEGMENT_RUNS + 5);
        assert_eq!(t.capacity(), 0);
        assert!(t.reserved_bytes() <= 64);
        // One run per insert (every other chunk of a group), so nodes run out often.
        let mut n = 0u64;
        let mut old = 0u64;
        while t.runs() < t.limit() {
            t.insert(old, 1000 + n).unwrap();
            assert!(t.capacity() >= t.runs() && t.capacity() < t.runs() + SEGMENT_RUNS + 1);
            n += 1;
            old += 2;
        }
        assert_eq!(t.capacity(), t.limit());
        assert_eq!(t.insert(old, 5000), Err(TableFull));
        assert!(!t.out_of_memory());
        assert_eq!(t.make_room(1), Err(Grow::Full));
        // Every run survived the growths and rehashes.
        for k in 0..n {
            assert_eq!(t.lookup(2 * k), Some(1000 + k));
            assert_eq!(t.lookup(2 * k + 1), None);
        }
        // A split (merge) can use the room a removal gave back, never more than the limit.
        t.clear();
        assert_eq!(t.capacity(), 0);
        assert_eq!(t.make_room(2), Ok(()));
        assert!(t.can_insert());
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
