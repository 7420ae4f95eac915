//! The group's failure state: one word every rank of a node sees, host and GPU alike.
//!
//! Any rank that times out, sees a mismatched call, rejects a collective call locally, or is told
//! to [`GroupFault::abort`], *raises* the fault: it stores a nonzero word (and the first cause as
//! text) into a page of shared memory that every rank of the node maps. From then on:
//! - every host wait on a peer (the host backend's barriers) polls the word and stops;
//! - every spinning GPU kernel polls it (the page is registered with CUDA, see
//!   [`GroupFault::word`]) every so many polls and leaves, so queued kernels drain at once instead
//!   of each waiting out its own timeout;
//! - every later call on every rank of the node checks it first and returns
//!   [`Error::Poisoned`] naming the first cause, never data.
//!
//! The check on the fast path is one relaxed load of a host word per call; kernels read the
//! word only while they already spin, so a call that does not wait pays nothing on the GPU.
//! Across nodes the ranks of other nodes learn of a failure through their own waits, which time
//! out because the failed ranks stop taking part.

use crate::error::{Error, Result};
use crate::shm::ShmSegment;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes of the page: the word, the claim, the cause's length and text.
const PAGE: usize = 4096;
const TEXT_OFFSET: usize = 64;
const TEXT_MAX: usize = PAGE - TEXT_OFFSET;

/// Bit set in a raised word.
pub(crate) const RAISED: u64 = 1 << 63;
/// What raised it, in bits 48..56 of the word.
pub(crate) const KIND_SHIFT: u32 = 48;
/// Raised by a kernel (the cause is in that rank's own error report).
pub(crate) const KIND_KERNEL: u64 = 1;
/// Raised by the host after an error.
pub(crate) const KIND_HOST: u64 = 2;
/// Raised by [`GroupFault::abort`].
pub(crate) const KIND_ABORT: u64 = 3;
/// The raising rank (global), in bits 32..48.
pub(crate) const RANK_SHIFT: u32 = 32;

/// The word a rank stores when it raises the fault.
pub(crate) const fn raised_word(kind: u64, rank: usize) -> u64 {
    RAISED | (kind << KIND_SHIFT) | ((rank as u64 & 0xffff) << RANK_SHIFT)
}

/// A view of the fault word that backends poll while they wait (copyable, no ownership).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FaultWord {
    word: *const AtomicU64,
}

// SAFETY: the word lives in a shared mapping that outlives every backend holding the view (the
// communicator drops backends before the fault page); access is atomic.
unsafe impl Send for FaultWord {}

impl FaultWord {
    /// True once any rank of the node raised the fault.
    #[inline]
    pub(crate) fn is_raised(&self) -> bool {
        // SAFETY: see the Send impl: the mapping is alive and the word is an AtomicU64.
        unsafe { (*self.word).load(Ordering::Acquire) != 0 }
    }

    /// A word that is never raised, for backends used without a group (tests).
    #[cfg(test)]
    pub(crate) fn never() -> Self {
        static ZERO: AtomicU64 = AtomicU64::new(0);
        FaultWord { word: &ZERO }
    }
}

/// The node's fault page.
pub(crate) struct GroupFault {
    seg: ShmSegment,
    rank: usize,
}

// SAFETY: every access to the page is an atomic operation on its words, except the cause's
// text, which only the thread that won the claim (a compare-exchange) writes, once, before it
// publishes the length with release order; so the page may be raised and read from any thread
// (an application's watchdog holds an `AbortHandle`).
unsafe impl Sync for GroupFault {}

impl GroupFault {
    /// Map the node's fault page (local rank 0 creates it).
    ///
    /// # Collective
    /// Every rank of `node`.
    ///
    /// # Errors
    /// As [`crate::shm::node_segment`].
    pub(crate) fn open<C: mpi::traits::Communicator>(
        node: &C,
        rank: usize,
        timeout: std::time::Duration,
    ) -> Result<Self> {
        let seg = crate::shm::node_segment(node, "fault", PAGE, timeout)?;
        Ok(GroupFault { seg, rank })
    }

    fn atom(&self) -> &AtomicU64 {
        // SAFETY: offset 0 of a page-aligned mapping of PAGE bytes.
        unsafe { &*(self.seg.as_ptr() as *const AtomicU64) }
    }

    fn claim(&self) -> &AtomicU32 {
        // SAFETY: offset 8, 4-byte aligned, inside the page.
        unsafe { &*(self.seg.as_ptr().add(8) as *const AtomicU32) }
    }

    fn text_len(&self) -> &AtomicU32 {
        // SAFETY: offset 12, 4-byte aligned, inside the page.
        unsafe { &*(self.seg.as_ptr().add(12) as *const AtomicU32) }
    }

    /// The view backends poll.
    pub(crate) fn word(&self) -> FaultWord {
        FaultWord { word: self.atom() }
    }

    /// The page, for registering it with the GPU runtime: (address, bytes).
    pub(crate) fn page(&self) -> (*mut u8, usize) {
        (self.seg.as_ptr(), PAGE)
    }

    /// Fail the group with `cause` (the first cause raised on the node is the one reported).
    pub(crate) fn raise(&self, cause: &Error) {
        self.raise_text(KIND_HOST, &cause.to_string());
    }

    /// Stop every pending and later call of the node's ranks ([`crate::Communicator::abort`]).
    pub(crate) fn abort(&self) {
        self.raise_text(KIND_ABORT, "aborted by Communicator::abort");
    }

    fn raise_text(&self, kind: u64, cause: &str) {
        // The first claimant writes the text, then the word (release), so a reader that sees the
        // word from a host raise also sees its text. A kernel may store the word without text;
        // readers then say which rank's kernel failed.
        if self.claim().compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let text = format!("rank {}: {cause}", self.rank);
            let bytes = &text.as_bytes()[..text.len().min(TEXT_MAX)];
            // SAFETY: inside the page; only the claimant writes the text, once.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.seg.as_ptr().add(TEXT_OFFSET), bytes.len()) };
            self.text_len().store(bytes.len() as u32, Ordering::Release);
        }
        let _ = self.atom().compare_exchange(0, raised_word(kind, self.rank), Ordering::AcqRel, Ordering::Acquire);
    }

    /// `Ok` while no rank of the node raised the fault.
    ///
    /// # Errors
    /// [`Error::Poisoned`] naming the first cause.
    #[inline]
    pub(crate) fn check(&self) -> Result<()> {
        let word = self.atom().load(Ordering::Acquire);
        if word == 0 {
            return Ok(());
        }
        Err(Error::Poisoned { cause: self.describe(word) })
    }

    /// The cause of a raised `word`.
    fn describe(&self, word: u64) -> String {
        let len = self.text_len().load(Ordering::Acquire) as usize;
        if len > 0 {
            // SAFETY: the claimant wrote `len` bytes before publishing the length.
            let bytes = unsafe { std::slice::from_raw_parts(self.seg.as_ptr().add(TEXT_OFFSET), len.min(TEXT_MAX)) };
            return String::from_utf8_lossy(bytes).into_owned();
        }
        let rank = (word >> RANK_SHIFT) & 0xffff;
        match (word >> KIND_SHIFT) & 0xff {
            KIND_KERNEL => format!("a kernel of rank {rank} timed out or saw a mismatched call"),
            KIND_ABORT => format!("rank {rank} aborted the communicator"),
            _ => format!("rank {rank} failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raised_words_carry_kind_and_rank() {
        let w = raised_word(KIND_KERNEL, 5);
        assert_ne!(w & RAISED, 0);
        assert_eq!((w >> KIND_SHIFT) & 0xff, KIND_KERNEL);
        assert_eq!((w >> RANK_SHIFT) & 0xffff, 5);
        assert!(!FaultWord::never().is_raised());
    }
}
