//! The custom backend's rank-data rows: which rows of the table are in use, by whom.
//!
//! A row holds one buffer's address in every rank's address space; a kernel gets a pointer to
//! its row, so a call captured into a CUDA graph has fixed arguments and its row can be filled
//! after capture. Rows are handed out in ranges:
//! - row 0: the staging buffers (written at set-up);
//! - one row per registered buffer (`alloc_shared`), for its lifetime; calls at any offset
//!   inside it use that row plus the offset, so eager calls never write a row;
//! - one contiguous range per graph registration: a capture reserves the largest free range,
//!   gives each distinct address it reads one row (calls reading the same address share it),
//!   and at the end keeps only the rows it used, all written in one copy.
//!
//! Rows given back while the GPU may still read them (a dropped graph whose last replay may be
//! in flight) wait in quarantine until the owner has synchronised the device; only then are they
//! handed out again.

use std::ops::Range;

/// Rows of the table: 8 MiB of 64-byte rows, as vLLM's custom allreduce allocates.
pub(crate) const ROWS: u32 = 131_072;

/// Free and quarantined row ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowArena {
    /// Free ranges, sorted, never adjacent (coalesced).
    free: Vec<Range<u32>>,
    /// Given back, not yet safe to hand out.
    quarantine: Vec<Range<u32>>,
}

impl RowArena {
    /// An arena of rows `rows` (all free).
    pub(crate) fn new(rows: Range<u32>) -> Self {
        RowArena { free: if rows.is_empty() { Vec::new() } else { vec![rows] }, quarantine: Vec::new() }
    }

    /// `n` contiguous rows, first fit.
    pub(crate) fn alloc(&mut self, n: u32) -> Option<Range<u32>> {
        let i = self.free.iter().position(|r| r.len() >= n as usize)?;
        let r = &mut self.free[i];
        let got = r.start..r.start + n;
        r.start += n;
        if r.start == r.end {
            self.free.remove(i);
        }
        Some(got)
    }

    /// The largest free range, whole (for a capture, which does not know how many rows it needs).
    pub(crate) fn reserve_largest(&mut self) -> Option<Range<u32>> {
        let (i, _) = self.free.iter().enumerate().max_by_key(|(_, r)| r.len())?;
        Some(self.free.remove(i))
    }

    /// Rows the GPU never saw (the unused end of a reservation): free at once.
    pub(crate) fn give_back(&mut self, rows: Range<u32>) {
        if rows.is_empty() {
            return;
        }
        let at = self.free.partition_point(|r| r.start < rows.start);
        self.free.insert(at, rows);
        // Coalesce with the neighbours.
        if at + 1 < self.free.len() && self.free[at].end == self.free[at + 1].start {
            self.free[at].end = self.free[at + 1].end;
            self.free.remove(at + 1);
        }
        if at > 0 && self.free[at - 1].end == self.free[at].start {
            self.free[at - 1].end = self.free[at].end;
            self.free.remove(at);
        }
    }

    /// Rows the GPU may still read: free once [`RowArena::recycle`] is called.
    pub(crate) fn release(&mut self, rows: Range<u32>) {
        if !rows.is_empty() {
            self.quarantine.push(rows);
        }
    }

    /// Whether rows wait for the device to finish.
    pub(crate) fn has_quarantine(&self) -> bool {
        !self.quarantine.is_empty()
    }

    /// Free every quarantined row: call after the device finished all work given so far.
    #[cfg(test)]
    pub(crate) fn recycle(&mut self) {
        for rows in std::mem::take(&mut self.quarantine) {
            self.give_back(rows);
        }
    }

    /// As [`RowArena::recycle`], running `clean` on each range first (zeroing its rows); a range
    /// `clean` fails on stays in quarantine.
    ///
    /// # Errors
    /// The first error of `clean`.
    pub(crate) fn recycle_with<E>(&mut self, mut clean: impl FnMut(&Range<u32>) -> Result<(), E>) -> Result<(), E> {
        while let Some(rows) = self.quarantine.pop() {
            if let Err(e) = clean(&rows) {
                self.quarantine.push(rows);
                return Err(e);
            }
            self.give_back(rows);
        }
        Ok(())
    }

    /// Rows free now.
    #[cfg(test)]
    pub(crate) fn free_rows(&self) -> usize {
        self.free.iter().map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_handed_out_once_and_coalesce_when_given_back() {
        let mut a = RowArena::new(1..ROWS);
        let x = a.alloc(1).unwrap();
        let y = a.alloc(3).unwrap();
        assert_eq!((x.clone(), y.clone()), (1..2, 2..5));
        a.give_back(x);
        assert_eq!(a.alloc(2).unwrap(), 5..7, "a hole of one row does not take two");
        assert_eq!(a.alloc(1).unwrap(), 1..2, "first fit reuses the hole");
        a.give_back(1..2);
        a.give_back(5..7);
        a.give_back(y);
        assert_eq!(a, RowArena::new(1..ROWS), "everything coalesces back into one range");
        assert!(a.alloc(ROWS).is_none());
    }

    #[test]
    fn released_rows_wait_for_recycle() {
        let mut a = RowArena::new(1..11);
        let r = a.reserve_largest().unwrap();
        assert_eq!((r.clone(), a.free_rows()), (1..11, 0));
        a.give_back(5..11); // the capture used rows 1..5
        a.release(1..5); // its graph was dropped
        assert!(a.has_quarantine());
        assert_eq!(a.free_rows(), 6);
        assert_eq!(a.alloc(7), None, "quarantined rows are not handed out");
        a.recycle();
        assert_eq!((a.free_rows(), a.has_quarantine()), (10, false));
        assert_eq!(a.alloc(10), Some(1..11));
    }

    #[test]
    fn an_engine_capturing_thousands_of_graphs_never_runs_out() {
        // 67 batch sizes x 160 calls per graph, each graph reading its own buffers, recaptured
        // ten times (old graphs dropped): rows come back every time.
        let mut a = RowArena::new(1..ROWS);
        let staging_and_buffers = a.alloc(81).unwrap();
        for _round in 0..10 {
            let mut held = Vec::new();
            for _graph in 0..67 {
                let r = a.reserve_largest().unwrap();
                let used = r.start..r.start + 160;
                a.give_back(used.end..r.end);
                held.push(used);
            }
            assert!(a.free_rows() >= ROWS as usize - 82 - 67 * 160);
            for used in held {
                a.release(used);
            }
            a.recycle();
        }
        a.give_back(staging_and_buffers);
        assert_eq!(a.free_rows(), ROWS as usize - 1);
    }
}
