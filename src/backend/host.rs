//! Host backend: allreduce of host memory among the ranks of one node through POSIX shared
//! memory.
//!
//! ## Segment layout (one per node, created by local rank 0)
//! ```text
//! flags   [n]          per rank, 128 bytes apart: the last barrier step it reached (u64),
//!                      and 64 bytes further the number of peers sleeping on that flag
//! desc    [2][n]       call descriptors (length, dtype, algorithm, call number)
//! input   [2][n][C]    each rank's copy of its input chunk
//! shards  [2][C]       reduced shards of the current chunk (two-shot, gather)
//! ```
//! `C` is `TPCOMM_HOST_CHUNK_BYTES`; longer messages are reduced chunk by chunk.
//!
//! ## Protocol
//! Every rank counts barrier steps `s = 1, 2, ...` (monotonic, never reset, identical on all
//! ranks because every rank makes the same calls). A barrier is: store `s` into my flag with
//! release order, then wait until every peer's flag is `>= s` with acquire order.
//!
//! **The one rule that makes buffer reuse safe:** data written before barrier `s` and read after
//! it lives in buffer `[s % 2]`. A reader finishes reading before it stores `s + 1`; a writer
//! writes `[s % 2]` again only before barrier `s + 2`, which it reaches after waiting for every
//! `s + 1`. So no rank overwrites what a peer may still read, with no extra barrier.
//!
//! Sums run over ranks `0..n-1` in that order in [`Element::Acc`], rounded once, so every rank
//! gets the same bits from either algorithm and for every chunking.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::fault::FaultWord;
use crate::shm::ShmSegment;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const FLAG_STRIDE: usize = 128;
/// Offset, within a rank's flag line, of the count of peers sleeping on that flag.
const SLEEPERS_OFFSET: usize = 64;
/// How long a wait polls before it sleeps on the peer's flag, when every rank of the node has a
/// core of its own. Polling keeps the core: yielding it to an unrelated busy process, or waking
/// from a sleep on a busy machine, can cost a whole scheduler time slice (milliseconds).
const POLL_BEFORE_SLEEP: Duration = Duration::from_millis(2);
/// The same when the node's ranks outnumber its cores: poll briefly, yielding the core (a peer
/// may need it), then sleep.
const POLL_BEFORE_SLEEP_OVERSUBSCRIBED: Duration = Duration::from_micros(20);
/// Longest single sleep; a safety net, since every store that a sleeper waits for wakes it.
const MAX_SLEEP: Duration = Duration::from_millis(1);
const DESC_STRIDE: usize = 64;
/// Shards are cut at multiples of this many bytes so ranks never share a cache line.
const SHARD_ALIGN: usize = 64;
/// Elements reduced per accumulator block (kept in registers/L1, lets the compiler vectorise).
const BLOCK: usize = 512;

/// The host algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostKernel {
    /// Every rank reads every rank's input.
    OneShot = 1,
    /// Reduce-scatter, then all-gather.
    TwoShot = 2,
    /// The gather of the cross-node plan (not an allreduce).
    Gather = 3,
}

impl HostKernel {
    fn name(code: u32) -> &'static str {
        match code {
            1 => "host one-shot",
            2 => "host two-shot",
            3 => "host gather",
            _ => "an unknown host call",
        }
    }
}

/// What a rank says about its call, compared across ranks at the first barrier of every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct CallDesc {
    call: u64,
    len: u64,
    dtype: u32,
    algo: u32,
}

/// Shared-memory allreduce among the ranks of one node.
pub(crate) struct HostAllreduce {
    seg: ShmSegment,
    rank: usize,
    n: usize,
    /// Global rank of every local rank, for error messages.
    global_ranks: Vec<usize>,
    chunk: usize,
    step: u64,
    calls: u64,
    timeout: Duration,
    /// The node's ranks outnumber its cores: waits yield the core and sleep sooner.
    oversubscribed: bool,
    /// How long a wait polls before sleeping on the peer's flag.
    poll_before_sleep: Duration,
    /// The group's fault word: a wait stops as soon as any rank of the node failed.
    fault: FaultWord,
}

impl HostAllreduce {
    /// Bytes of shared memory a node of `n` ranks needs with `chunk`-byte slots.
    pub(crate) fn segment_bytes(n: usize, chunk: usize) -> usize {
        n * FLAG_STRIDE + 2 * n * DESC_STRIDE + 2 * n * chunk + 2 * chunk
    }

    /// Map the node's segment. `rank`/`n` are local to the node; `global_ranks[i]` is the
    /// communicator rank of local rank `i`. Local rank 0 must have created `seg` zero-filled.
    pub(crate) fn new(
        seg: ShmSegment,
        rank: usize,
        global_ranks: Vec<usize>,
        chunk: usize,
        timeout: Duration,
        fault: FaultWord,
    ) -> Result<Self> {
        let n = global_ranks.len();
        if rank >= n || chunk % SHARD_ALIGN != 0 || seg.len() < Self::segment_bytes(n, chunk) {
            return Err(Error::Internal(format!(
                "host segment {} of {} bytes does not fit {n} ranks of {chunk}-byte chunks",
                seg.name(),
                seg.len()
            )));
        }
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let oversubscribed = n > cores;
        let poll_before_sleep = if oversubscribed { POLL_BEFORE_SLEEP_OVERSUBSCRIBED } else { POLL_BEFORE_SLEEP };
        Ok(HostAllreduce {
            seg,
            rank,
            n,
            global_ranks,
            chunk,
            step: 0,
            calls: 0,
            timeout,
            oversubscribed,
            poll_before_sleep,
            fault,
        })
    }

    fn flag(&self, r: usize) -> &AtomicU64 {
        // SAFETY: inside the segment, 128-byte aligned (the mapping is page aligned).
        unsafe { &*(self.seg.as_ptr().add(r * FLAG_STRIDE) as *const AtomicU64) }
    }

    fn desc_ptr(&self, parity: u64, r: usize) -> *mut CallDesc {
        let off = self.n * FLAG_STRIDE + (parity as usize * self.n + r) * DESC_STRIDE;
        // SAFETY: inside the segment (checked in `new`).
        unsafe { self.seg.as_ptr().add(off) as *mut CallDesc }
    }

    fn input_ptr(&self, parity: u64, r: usize) -> *mut u8 {
        let off = self.n * FLAG_STRIDE + 2 * self.n * DESC_STRIDE + (parity as usize * self.n + r) * self.chunk;
        // SAFETY: inside the segment (checked in `new`).
        unsafe { self.seg.as_ptr().add(off) }
    }

    fn shard_ptr(&self, parity: u64) -> *mut u8 {
        let off =
            self.n * FLAG_STRIDE + 2 * self.n * DESC_STRIDE + 2 * self.n * self.chunk + parity as usize * self.chunk;
        // SAFETY: inside the segment (checked in `new`).
        unsafe { self.seg.as_ptr().add(off) }
    }

    /// Parity of the next barrier step: the buffer set written now and read after it.
    fn next_parity(&self) -> u64 {
        (self.step + 1) % 2
    }

    /// Elements of `T` per chunk.
    fn chunk_elems<T: Element>(&self) -> usize {
        self.chunk / std::mem::size_of::<T>()
    }

    /// Number of ranks asleep on rank `r`'s flag (on its own cache line, away from the flag).
    fn sleepers(&self, r: usize) -> &AtomicU32 {
        // SAFETY: inside the segment, 64 bytes past rank r's flag, 4-byte aligned.
        unsafe { &*(self.seg.as_ptr().add(r * FLAG_STRIDE + SLEEPERS_OFFSET) as *const AtomicU32) }
    }

    /// Publish step `s` and wait for every peer to reach it. Spins briefly, then sleeps on the
    /// peer's flag (a futex on Linux, woken by the peer's store), so it stays fast and does not
    /// livelock when ranks outnumber cores. Bounded by the timeout, and left at once when the
    /// group's fault word is raised (another rank failed: it will never arrive).
    fn barrier(&mut self, what: &'static str) -> Result<()> {
        self.step += 1;
        let s = self.step;
        // SeqCst (so also release): everything this rank wrote into the segment before is
        // visible to a peer that reads flag >= s with acquire. The store is ordered before the
        // sleepers load below, and a sleeper's registration before its flag load, so either the
        // sleeper sees `s` or this rank sees the sleeper and wakes it: no lost wake-up.
        let mine = self.flag(self.rank);
        mine.store(s, Ordering::SeqCst);
        if self.sleepers(self.rank).load(Ordering::SeqCst) > 0 {
            wake_all(mine);
        }
        let start = Instant::now();
        for p in 0..self.n {
            if p == self.rank {
                continue;
            }
            let flag = self.flag(p);
            let mut spins = 0u32;
            while flag.load(Ordering::Acquire) < s {
                spins += 1;
                if spins % 256 != 0 {
                    std::hint::spin_loop();
                    continue;
                }
                if self.fault.is_raised() {
                    return Err(Error::PeerFailed { step: what.to_string() });
                }
                let waited = start.elapsed();
                if waited > self.timeout {
                    return Err(Error::PeerTimeout { op: what, peer: Some(self.global_ranks[p]), waited });
                }
                if waited < self.poll_before_sleep {
                    if self.oversubscribed {
                        // The peer may need this very core: hand it over, but stay runnable.
                        std::thread::yield_now();
                    }
                    continue;
                }
                let sleepers = self.sleepers(p);
                sleepers.fetch_add(1, Ordering::SeqCst);
                let seen = flag.load(Ordering::SeqCst);
                if seen < s {
                    wait_while_equal(flag, seen, (self.timeout - waited).min(MAX_SLEEP));
                }
                sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Write this call's descriptor for the coming barrier.
    fn publish_desc(&mut self, len: usize, dtype: u32, kernel: HostKernel) -> CallDesc {
        self.calls += 1;
        let d = CallDesc { call: self.calls, len: len as u64, dtype, algo: kernel as u32 };
        // SAFETY: my own descriptor slot of the next parity; peers read it only after the barrier.
        unsafe { self.desc_ptr(self.next_parity(), self.rank).write_volatile(d) };
        d
    }

    /// After the barrier: every rank's descriptor must equal mine.
    fn check_descs(&mut self, mine: CallDesc, op: &'static str) -> Result<()> {
        let parity = self.step % 2;
        for p in 0..self.n {
            // SAFETY: written by p before the barrier we just passed (acquire on its flag).
            let theirs = unsafe { self.desc_ptr(parity, p).read_volatile() };
            if theirs != mine {
                let call = |d: &CallDesc, r: usize| {
                    format!(
                        "rank {} made call #{}: {} with {} elements of {}",
                        self.global_ranks[r],
                        d.call,
                        HostKernel::name(d.algo),
                        d.len,
                        DType::from_code(d.dtype).map_or("an unknown dtype", DType::as_str)
                    )
                };
                return Err(Error::Mismatch {
                    op,
                    detail: format!("{}; {}", call(&theirs, p), call(&mine, self.rank)),
                });
            }
        }
        Ok(())
    }

    /// Allreduce (sum) of `input` into `output` with `kernel` (one-shot or two-shot).
    /// `input = None` reduces `output` in place.
    ///
    /// # Collective
    /// Every rank of the node, same length, dtype and algorithm.
    pub(crate) fn all_reduce<T: Element>(
        &mut self,
        input: Option<&[T]>,
        output: &mut [T],
        kernel: HostKernel,
    ) -> Result<()> {
        let op = "host allreduce";
        if let Some(input) = input {
            if input.len() != output.len() {
                return Err(Error::invalid(op, format!("input has {} elements, output {}", input.len(), output.len())));
            }
        }
        if kernel == HostKernel::Gather {
            return Err(Error::Internal("host backend asked to allreduce with its gather".into()));
        }
        let len = output.len();
        let per_chunk = self.chunk_elems::<T>();
        let mut offset = 0;
        let mut first = true;
        // A zero-length call still takes one step, so ranks that disagree about the length
        // find out instead of drifting apart.
        while first || offset < len {
            let m = per_chunk.min(len - offset);
            let src: *const T = match input {
                Some(x) => x[offset..offset + m].as_ptr(),
                None => output[offset..offset + m].as_ptr(),
            };
            let desc = first.then(|| self.publish_desc(len, T::DTYPE.code(), kernel));
            // My input chunk goes into input[parity][me]; peers read it after the barrier.
            // Two-shot: all of it but my own shard, which only I reduce (from my input itself).
            let parity = self.next_parity();
            let shard = shard_range::<T>(m, self.n, self.rank);
            let published = match kernel {
                HostKernel::OneShot => [0..m, m..m],
                _ => [0..shard.start, shard.end..m],
            };
            let slot = self.input_ptr(parity, self.rank) as *mut T;
            for part in published {
                // SAFETY: the part lies within `m` elements, which fit the chunk slot and src.
                unsafe { std::ptr::copy_nonoverlapping(src.add(part.start), slot.add(part.start), part.len()) };
            }
            self.barrier("host allreduce: inputs published")?;
            if let Some(desc) = desc {
                self.check_descs(desc, op)?;
            }
            match kernel {
                // My own term is read where it is, not from my published copy: from my input,
                // or in place from the output itself (each block is read before it is written).
                HostKernel::OneShot => {
                    let out = &mut output[offset..offset + m];
                    match input {
                        Some(x) => self.reduce_range_with(parity, 0..m, &x[offset..offset + m], out),
                        None => self.reduce_range_in_place(parity, 0..m, out),
                    }
                }
                _ => {
                    // Reduce-scatter: I reduce my shard into shards[next parity], my own part
                    // read where it is (in place too: the output is written only after).
                    let sp = self.next_parity();
                    // SAFETY: the shard buffer holds a whole chunk; my range is mine alone.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut((self.shard_ptr(sp) as *mut T).add(shard.start), shard.len())
                    };
                    // SAFETY: src is valid for m elements and nothing writes them before the
                    // gather below.
                    let mine = unsafe { std::slice::from_raw_parts(src.add(shard.start), shard.len()) };
                    self.reduce_range_with(parity, shard, mine, dst);
                    self.barrier("host allreduce: shards reduced")?;
                    let out = &mut output[offset..offset + m];
                    // All-gather: every shard is complete after the barrier.
                    // SAFETY: m elements of the shard buffer, written before the barrier.
                    unsafe { std::ptr::copy_nonoverlapping(self.shard_ptr(sp) as *const T, out.as_mut_ptr(), m) };
                }
            }
            offset += m;
            first = false;
        }
        Ok(())
    }

    /// `dst = sum over ranks (in order) of input[parity][r][range]`, this rank's own term taken
    /// from `mine` instead of its published copy.
    fn reduce_range_with<T: Element>(&self, parity: u64, range: Range<usize>, mine: &[T], dst: &mut [T]) {
        debug_assert_eq!(range.len(), dst.len());
        with_sources(
            self.n,
            |r| if r == self.rank { mine } else { self.published(parity, r, &range) },
            |srcs| reduce_rank_order(srcs, None, dst),
        );
    }

    /// The same where `dst` holds this rank's own term on entry (in place).
    fn reduce_range_in_place<T: Element>(&self, parity: u64, range: Range<usize>, dst: &mut [T]) {
        debug_assert_eq!(range.len(), dst.len());
        with_sources(
            self.n,
            |r| if r == self.rank { &[] } else { self.published(parity, r, &range) },
            |srcs| reduce_rank_order(srcs, Some(self.rank), dst),
        );
    }

    /// Rank `r`'s published input chunk, elements `range`.
    fn published<T: Element>(&self, parity: u64, r: usize, range: &Range<usize>) -> &[T] {
        // SAFETY: rank r wrote at least range.end elements before the barrier we passed.
        unsafe { std::slice::from_raw_parts((self.input_ptr(parity, r) as *const T).add(range.start), range.len()) }
    }

    /// Each local rank contributes `buf[ranges[rank]]`; afterwards every rank's `buf` holds all
    /// the ranges. Ranges must be disjoint and the same on every rank.
    ///
    /// # Collective
    /// Every rank of the node, same length and ranges.
    pub(crate) fn all_gather_ranges<T: Element>(&mut self, buf: &mut [T], ranges: &[Range<usize>]) -> Result<()> {
        if ranges.len() != self.n || ranges.iter().any(|r| r.end > buf.len() || r.start > r.end) {
            return Err(Error::Internal(format!("gather ranges {ranges:?} do not fit {} elements", buf.len())));
        }
        let per_chunk = self.chunk_elems::<T>();
        let mut offset = 0;
        let mut first = true;
        while first || offset < buf.len() {
            let chunk = offset..(offset + per_chunk).min(buf.len());
            let desc = first.then(|| self.publish_desc(buf.len(), T::DTYPE.code(), HostKernel::Gather));
            let parity = self.next_parity();
            let mine = intersect(&ranges[self.rank], &chunk);
            // SAFETY: the shard buffer holds a whole chunk; my range is mine alone.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf[mine.clone()].as_ptr(),
                    (self.shard_ptr(parity) as *mut T).add(mine.start - chunk.start),
                    mine.len(),
                )
            };
            self.barrier("host gather: ranges published")?;
            if let Some(desc) = desc {
                self.check_descs(desc, "host gather")?;
            }
            for (r, range) in ranges.iter().enumerate() {
                let part = intersect(range, &chunk);
                if r != self.rank && !part.is_empty() {
                    // SAFETY: written by rank r before the barrier.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (self.shard_ptr(parity) as *const T).add(part.start - chunk.start),
                            buf[part.clone()].as_mut_ptr(),
                            part.len(),
                        )
                    };
                }
            }
            offset = chunk.end;
            first = false;
        }
        Ok(())
    }
}

/// The 32-bit futex word of a flag: its low half.
#[cfg(target_os = "linux")]
fn futex_word(flag: &AtomicU64) -> *const u32 {
    let p = flag as *const AtomicU64 as *const u32;
    if cfg!(target_endian = "big") {
        // SAFETY: both halves lie inside the 8-byte flag.
        unsafe { p.add(1) }
    } else {
        p
    }
}

/// Sleep until `flag` may differ from `seen` (or `timeout` passes, or a spurious wake-up).
fn wait_while_equal(flag: &AtomicU64, seen: u64, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: a shared (not private) futex wait on a word of the mapped segment; the kernel
        // returns at once if the word no longer holds `seen`, so a wake-up cannot be lost.
        unsafe { libc::syscall(libc::SYS_futex, futex_word(flag), libc::FUTEX_WAIT, seen as u32, &ts as *const _) };
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (flag, seen);
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
    }
}

/// Wake every process sleeping on `flag`.
fn wake_all(flag: &AtomicU64) {
    #[cfg(target_os = "linux")]
    // SAFETY: a shared futex wake on a word of the mapped segment.
    unsafe {
        libc::syscall(libc::SYS_futex, futex_word(flag), libc::FUTEX_WAKE, i32::MAX)
    };
    #[cfg(not(target_os = "linux"))]
    let _ = flag;
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    let start = a.start.max(b.start);
    start..a.end.min(b.end).max(start)
}

/// Shard `rank` of `len` elements split over `n` ranks: cut at 64-byte multiples, the remainder
/// spread over the first shards, never a tail dropped.
pub(crate) fn shard_range<T>(len: usize, n: usize, rank: usize) -> Range<usize> {
    let unit = (SHARD_ALIGN / size_of::<T>()).max(1);
    let units = len.div_ceil(unit);
    let (base, extra) = (units / n, units % n);
    let first_unit = rank * base + rank.min(extra);
    let my_units = base + usize::from(rank < extra);
    let start = (first_unit * unit).min(len);
    start..((first_unit + my_units) * unit).min(len)
}

/// `dst[i] = srcs[0][i] + srcs[1][i] + ...` in that order in `T::Acc`, rounded once.
/// Call `f` with the `n` slices `source(0..n)`, on the stack up to 16 ranks (a call of a few
/// KiB is short enough for a heap allocation to show).
fn with_sources<'a, T: 'a>(n: usize, source: impl Fn(usize) -> &'a [T], f: impl FnOnce(&[&'a [T]])) {
    const ON_STACK: usize = 16;
    if n <= ON_STACK {
        let mut srcs: [&[T]; ON_STACK] = [&[]; ON_STACK];
        for (r, s) in srcs.iter_mut().enumerate().take(n) {
            *s = source(r);
        }
        f(&srcs[..n]);
    } else {
        f(&(0..n).map(source).collect::<Vec<_>>());
    }
}

/// `dst = srcs[0] + srcs[1] + ...` in that order, in the accumulator type, rounded once. With
/// `own = Some(r)`, `dst` itself holds term r on entry (`srcs[r]` is not read): each block of
/// `dst` is read whole before it is written.
fn reduce_rank_order<T: Element>(srcs: &[&[T]], own: Option<usize>, dst: &mut [T]) {
    let mut acc = [T::Acc::default(); BLOCK];
    let mut wide = [T::Acc::default(); BLOCK];
    let mut start = 0;
    while start < dst.len() {
        let m = BLOCK.min(dst.len() - start);
        let (acc, wide) = (&mut acc[..m], &mut wide[..m]);
        for (r, src) in srcs.iter().enumerate() {
            let term = if own == Some(r) { &dst[start..start + m] } else { &src[start..start + m] };
            if r == 0 {
                T::widen(term, acc);
                continue;
            }
            T::widen(term, wide);
            for (a, w) in acc.iter_mut().zip(wide.iter()) {
                *a += *w;
            }
        }
        T::narrow(acc, &mut dst[start..start + m]);
        start += m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_everything_once() {
        for len in [0usize, 1, 15, 16, 17, 1000, 4099] {
            for n in 1..=8 {
                let mut next = 0;
                for r in 0..n {
                    let s = shard_range::<f32>(len, n, r);
                    assert_eq!(s.start, next, "len {len} n {n} r {r}");
                    assert!(s.start % 16 == 0 || s.start == len);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn block_reduction_matches_reference() {
        let a: Vec<f32> = (0..1500).map(|i| (i as f32).sin() * 1e3).collect();
        let b: Vec<f32> = (0..1500).map(|i| (i as f32).cos() * 1e-3).collect();
        let c: Vec<f32> = (0..1500).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![f32::NAN; 1500];
        reduce_rank_order(&[&a[..], &b[..], &c[..]], None, &mut out);
        let want = crate::dtype::reference_sum(&[&a[..], &b[..], &c[..]]);
        assert!(out.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// In place, the own term is read from `dst` itself (its source slot is never read) and the
    /// sum keeps rank order, whichever rank owns `dst`.
    #[test]
    fn in_place_block_reduction_matches_reference() {
        let terms: Vec<Vec<f32>> = (0..3)
            .map(|r| (0..1500i32).map(|i| ((i * 7 + r * 13) as f32).sin() * 10f32.powi(i % 9 - 4)).collect())
            .collect();
        let want = crate::dtype::reference_sum(&[&terms[0][..], &terms[1][..], &terms[2][..]]);
        for own in 0..3 {
            let mut dst = terms[own].clone();
            let srcs: Vec<&[f32]> = (0..3).map(|r| if r == own { &[][..] } else { &terms[r][..] }).collect();
            reduce_rank_order(&srcs, Some(own), &mut dst);
            let bad = dst.iter().zip(&want).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(bad, 0, "own {own}: {bad} of {} elements differ from the rank-order sum", dst.len());
        }
    }
}
