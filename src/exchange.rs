//! Byte exchange between ranks over MPI, every wait bounded.
//!
//! The bottom layer of the crate: bootstrap, topology and every backend's set-up exchange their
//! handles and verdicts through these functions, and nothing here knows about any of them.
//!
//! Each exchange is a non-blocking MPI collective polled against a deadline, so a rank that never
//! arrives turns into [`Error::PeerTimeout`] on the others instead of a hang. A collective that
//! timed out cannot be cancelled: its buffers are leaked on purpose (MPI may still write into
//! them) and the caller must treat the group as failed.

use crate::error::{Error, Result};
use crate::fault::FaultWord;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::request::{Request, StaticScope};
use mpi::traits::*;
use std::time::{Duration, Instant};

/// A buffer lent to MPI for a non-blocking call. It is leaked while MPI may still use it and
/// reclaimed by [`MpiBuf::take`] once the request completed; one that is never taken (a
/// request that timed out) stays leaked, which is what keeps MPI's late writes harmless.
pub(crate) struct MpiBuf<T: ?Sized + 'static> {
    ptr: *mut T,
}

impl<T: ?Sized + 'static> MpiBuf<T> {
    /// Lend `value` to MPI.
    pub(crate) fn new(value: Box<T>) -> Self {
        MpiBuf { ptr: Box::into_raw(value) }
    }

    /// The buffer for MPI to read.
    pub(crate) fn shared(&self) -> &'static T {
        // SAFETY: the allocation is leaked until `take`, so it lives as long as MPI may read it;
        // nothing writes it through another path meanwhile.
        unsafe { &*self.ptr }
    }

    /// The buffer for MPI to write. Call once per buffer, for one request.
    pub(crate) fn exclusive(&mut self) -> &'static mut T {
        // SAFETY: as `shared`; the `&mut self` receiver keeps a second exclusive loan from being
        // made while this one is handed to a request.
        unsafe { &mut *self.ptr }
    }

    /// The buffer back, after the request that used it completed.
    pub(crate) fn take(self) -> Box<T> {
        // SAFETY: made by Box::into_raw in `new`; the request is complete, so MPI holds no
        // reference any more, and `self` is consumed, so this happens once.
        unsafe { Box::from_raw(self.ptr) }
    }
}

/// Set once any non-blocking MPI call of this process was abandoned (a wait that timed out).
static ABANDONED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn abandon<T>(request: T) {
    ABANDONED.store(true, std::sync::atomic::Ordering::Relaxed);
    // A collective cannot be cancelled; forgetting the request keeps its buffers alive.
    std::mem::forget(request);
}

/// An MPI communicator tpcomm owns (a duplicate or split of the application's). Freed on drop,
/// unless a non-blocking call of this process was abandoned: MPI may still progress it, and
/// freeing a communicator under a pending collective crashes MPI libraries, so after a timeout
/// tpcomm's communicators are leaked (a failed group is rebuilt over fresh communicators).
pub(crate) struct Comm(std::mem::ManuallyDrop<mpi::topology::SimpleCommunicator>);

impl Comm {
    pub(crate) fn new(comm: mpi::topology::SimpleCommunicator) -> Self {
        Comm(std::mem::ManuallyDrop::new(comm))
    }
}

impl std::ops::Deref for Comm {
    type Target = mpi::topology::SimpleCommunicator;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if !ABANDONED.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: dropped once, here.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.0) };
        }
    }
}

/// Poll briefly at first (collectives among present ranks finish in microseconds), then sleep
/// a little between polls, so a long wait does not burn a core another rank may need.
pub(crate) fn backoff(polls: &mut u32) {
    *polls += 1;
    if *polls < 256 {
        std::hint::spin_loop();
    } else if *polls < 4096 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Wait for `request` until `timeout` has passed since `start`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step`; the request is abandoned (and its buffers must stay
/// leaked).
pub(crate) fn wait<D: ?Sized>(
    request: Request<'static, D, StaticScope>,
    start: Instant,
    timeout: Duration,
    step: &'static str,
) -> Result<()> {
    wait_unless(request, start, timeout, step, None)
}

/// As [`wait`], and stop as soon as the group's fault word is raised (another rank failed: it
/// will not come).
///
/// # Errors
/// As [`wait`]; [`Error::PeerFailed`] naming `step` when the fault was raised meanwhile.
fn wait_unless<D: ?Sized>(
    mut request: Request<'static, D, StaticScope>,
    start: Instant,
    timeout: Duration,
    step: &'static str,
    fault: Option<FaultWord>,
) -> Result<()> {
    let mut polls = 0;
    loop {
        match request.test() {
            Ok(_) => return Ok(()),
            Err(pending) => request = pending,
        }
        let waited = start.elapsed();
        let failed = fault.is_some_and(|f| f.is_raised());
        if waited > timeout || failed {
            abandon(request);
            if failed {
                return Err(Error::PeerFailed { step: step.to_string() });
            }
            return Err(Error::PeerTimeout { op: step, peer: None, waited });
        }
        backoff(&mut polls);
    }
}

/// Wait for every request of `requests`; on timeout name `who(i)` of the first still pending.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step` and that peer; every pending request is abandoned.
pub(crate) fn wait_all<D: ?Sized>(
    requests: Vec<Request<'static, D, StaticScope>>,
    who: impl Fn(usize) -> Option<usize>,
    timeout: Duration,
    step: &'static str,
) -> Result<()> {
    let start = Instant::now();
    let mut pending: Vec<Option<Request<'static, D, StaticScope>>> = requests.into_iter().map(Some).collect();
    let mut polls = 0;
    while pending.iter().any(Option::is_some) {
        for slot in pending.iter_mut() {
            if let Some(req) = slot.take() {
                if let Err(req) = req.test() {
                    *slot = Some(req);
                }
            }
        }
        let waited = start.elapsed();
        if waited > timeout && pending.iter().any(Option::is_some) {
            let peer = pending.iter().position(Option::is_some).and_then(&who);
            for slot in pending.iter_mut() {
                abandon(slot.take());
            }
            return Err(Error::PeerTimeout { op: step, peer, waited });
        }
        backoff(&mut polls);
    }
    Ok(())
}

/// Wait until every rank of `comm` has reached this point.
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step` when a rank does not arrive within `timeout`.
pub(crate) fn barrier<C: Communicator>(comm: &C, timeout: Duration, step: &'static str) -> Result<()> {
    let start = Instant::now();
    wait(comm.immediate_barrier(), start, timeout, step)
}

/// Every rank's `mine`, in rank order.
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step`.
pub(crate) fn all_gather_u64<C: Communicator>(
    comm: &C,
    mine: u64,
    timeout: Duration,
    step: &'static str,
) -> Result<Vec<u64>> {
    let start = Instant::now();
    let n = comm.size() as usize;
    let send = MpiBuf::new(Box::new(mine));
    let mut recv = MpiBuf::new(vec![0u64; n].into_boxed_slice());
    wait(comm.immediate_all_gather_into(StaticScope, send.shared(), recv.exclusive()), start, timeout, step)?;
    drop(send.take());
    Ok(recv.take().into_vec())
}

/// The minimum of `mine` over the ranks of `comm` (a logical AND of verdicts, for example).
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step`.
pub(crate) fn all_min_u64<C: Communicator>(comm: &C, mine: u64, timeout: Duration, step: &'static str) -> Result<u64> {
    reduce_u64(comm, mine, SystemOperation::min(), timeout, step)
}

/// The maximum of `mine` over the ranks of `comm`.
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step`.
pub(crate) fn all_max_f64<C: Communicator>(comm: &C, mine: f64, timeout: Duration, step: &'static str) -> Result<f64> {
    let start = Instant::now();
    let send = MpiBuf::new(Box::new(mine));
    let mut recv = MpiBuf::new(Box::new(0.0f64));
    let req = comm.immediate_all_reduce_into(StaticScope, send.shared(), recv.exclusive(), SystemOperation::max());
    wait(req, start, timeout, step)?;
    drop(send.take());
    Ok(*recv.take())
}

fn reduce_u64<C: Communicator>(
    comm: &C,
    mine: u64,
    op: SystemOperation,
    timeout: Duration,
    step: &'static str,
) -> Result<u64> {
    let start = Instant::now();
    let send = MpiBuf::new(Box::new(mine));
    let mut recv = MpiBuf::new(Box::new(0u64));
    wait(comm.immediate_all_reduce_into(StaticScope, send.shared(), recv.exclusive(), op), start, timeout, step)?;
    drop(send.take());
    Ok(*recv.take())
}

/// Gather one byte blob from every rank of `comm`; blobs may differ in length. Returns them in
/// rank order.
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step`.
pub(crate) fn all_gather_bytes<C: Communicator>(
    comm: &C,
    mine: &[u8],
    timeout: Duration,
    step: &'static str,
) -> Result<Vec<Vec<u8>>> {
    all_gather_bytes_unless(comm, mine, timeout, step, None)
}

/// As [`all_gather_bytes`], stopping as soon as `fault` is raised.
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`Error::PeerTimeout`], or [`Error::PeerFailed`] once `fault` is raised.
pub(crate) fn all_gather_bytes_unless<C: Communicator>(
    comm: &C,
    mine: &[u8],
    timeout: Duration,
    step: &'static str,
    fault: Option<FaultWord>,
) -> Result<Vec<Vec<u8>>> {
    let start = Instant::now();
    let send = MpiBuf::new(Box::new(mine.len() as u64));
    let mut recv = MpiBuf::new(vec![0u64; comm.size() as usize].into_boxed_slice());
    let req = comm.immediate_all_gather_into(StaticScope, send.shared(), recv.exclusive());
    wait_unless(req, start, timeout, step, fault)?;
    drop(send.take());
    let lens = recv.take().into_vec();
    let total: usize = lens.iter().map(|&l| l as usize).sum();
    let n = lens.len();
    if total == 0 {
        // Nothing to move: an empty buffer's dangling pointer is not a valid MPI argument.
        return Ok(vec![Vec::new(); n]);
    }
    if total > i32::MAX as usize {
        return Err(Error::Internal(format!("{step}: {total} bytes exceed one MPI exchange")));
    }
    let counts: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let displs: Vec<i32> = counts
        .iter()
        .scan(0i32, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect();
    let send = MpiBuf::new(mine.to_vec().into_boxed_slice());
    let mut recv = MpiBuf::new(vec![0u8; total].into_boxed_slice());
    // The partition owns copies of the counts and borrows the leaked receive buffer; it is lent
    // to MPI like the buffers themselves.
    let mut part = MpiBuf::new(Box::new(PartitionMut::new(recv.exclusive(), counts.clone(), displs.clone())));
    let left = timeout.saturating_sub(start.elapsed());
    let req = comm.immediate_all_gather_varcount_into(StaticScope, send.shared(), part.exclusive());
    wait_unless(req, Instant::now(), left, step, fault)?;
    drop((part.take(), send.take()));
    let all = recv.take();
    Ok(counts.iter().zip(&displs).map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec()).collect())
}

/// Broadcast a byte blob from `root` to every rank of `comm`; `blob` is overwritten on the
/// others (its length too).
///
/// # Collective
/// Every rank of `comm`, same `root`.
///
/// # Errors
/// [`Error::PeerTimeout`] naming `step`.
pub(crate) fn broadcast_bytes<C: Communicator>(
    comm: &C,
    root: usize,
    blob: &mut Vec<u8>,
    timeout: Duration,
    step: &'static str,
) -> Result<()> {
    let start = Instant::now();
    let mut len = MpiBuf::new(Box::new(blob.len() as u64));
    let req = comm.process_at_rank(root as i32).immediate_broadcast_into(StaticScope, len.exclusive());
    wait(req, start, timeout, step)?;
    let len = *len.take() as usize;
    if len == 0 {
        blob.clear();
        return Ok(());
    }
    blob.resize(len, 0);
    let mut buf = MpiBuf::new(std::mem::take(blob).into_boxed_slice());
    let req = comm.process_at_rank(root as i32).immediate_broadcast_into(StaticScope, buf.exclusive());
    wait(req, start, timeout, step)?;
    *blob = buf.take().into_vec();
    Ok(())
}

/// Make every rank of `comm` agree whether a step succeeded everywhere, so no rank goes on to
/// an exchange the others skip. Returns the local error where this rank failed, and
/// [`Error::PeerFailed`] naming the step where only another rank did.
///
/// # Collective
/// Every rank of `comm`, after the same step.
///
/// # Errors
/// As above, or [`Error::PeerTimeout`] when a rank does not arrive within `timeout`.
pub(crate) fn agree<C: Communicator, T>(
    comm: &C,
    local: Result<T>,
    timeout: Duration,
    step: &'static str,
) -> Result<T> {
    let all_ok = all_min_u64(comm, u64::from(local.is_ok()), timeout, step);
    match (local, all_ok) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(timeout)) => Err(timeout),
        (Ok(_), Ok(0)) => Err(Error::PeerFailed { step: step.to_string() }),
        (Ok(v), Ok(_)) => Ok(v),
    }
}

/// Split `blob` into `n` records of `size` bytes each (a peer's blob of IPC handles, say).
///
/// # Errors
/// [`Error::Mismatch`] naming `step` and `rank` when the blob has another length: a peer
/// running another version of tpcomm, never a panic.
pub(crate) fn records<'b>(
    blob: &'b [u8],
    n: usize,
    size: usize,
    rank: usize,
    step: &'static str,
) -> Result<Vec<&'b [u8]>> {
    if blob.len() != n * size {
        return Err(Error::Mismatch {
            op: step,
            detail: format!(
                "rank {rank} sent {} bytes where {n} records of {size} bytes were expected (a peer running another \
                 version of tpcomm?)",
                blob.len()
            ),
        });
    }
    Ok(blob.chunks_exact(size.max(1)).take(n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_the_wrong_length_are_a_mismatch_not_a_panic() {
        let blob = [1u8, 2, 3, 4, 5, 6];
        assert_eq!(records(&blob, 3, 2, 1, "test").unwrap(), vec![&[1u8, 2][..], &[3, 4], &[5, 6]]);
        let err = records(&blob[..5], 3, 2, 4, "test").unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }) && err.to_string().contains("rank 4"), "{err}");
        assert!(records(&[], 0, 64, 0, "test").unwrap().is_empty());
    }

    #[test]
    fn lent_buffers_come_back() {
        let mut b = MpiBuf::new(vec![1u8, 2, 3].into_boxed_slice());
        b.exclusive()[1] = 9;
        assert_eq!(&*b.take(), &[1, 9, 3]);
    }
}
