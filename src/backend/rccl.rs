//! RCCL allreduce: a ROCm build's backend of the NCCL slot (large device messages, ranks on
//! several nodes, GPUs without peer access), through `runtime::hip::rccl` (RCCL loaded at run
//! time with `dlopen`). `backend/nccl.rs` is the CUDA build's; `backend/mod.rs` picks one per
//! build, so the device layer builds "the NCCL backend" without knowing which.
//!
//! **Never run on AMD hardware.** The steps follow the NCCL backend, each ending with an
//! agreement over MPI so a failure on one rank is an error on every rank:
//!
//! 1. every rank's GPU UUID is gathered; two ranks on one GPU make [`Error::Unsupported`] on
//!    every rank (RCCL, like NCCL, refuses them);
//! 2. RCCL is loaded on every rank ([`Error::Unsupported`] saying what to install where it is
//!    missing);
//! 3. rank 0 makes the unique id and broadcasts it over MPI;
//! 4. `ncclCommInitRankConfig` with `blocking = 0`, polled until every rank joined or the
//!    timeout passed (the communicator is then aborted: [`Error::PeerTimeout`]); RCCL older than
//!    2.14 has no non-blocking communicators and is [`Error::Unsupported`];
//! 5. each allreduce only enqueues `ncclAllReduce` on the caller's stream and records an event
//!    after an eager one; `poll` reads RCCL's asynchronous error and, while that event has not
//!    completed, how long the call has been pending: past the timeout the communicator is
//!    aborted (a peer never came) and the call's error is [`Error::PeerTimeout`]. A failure
//!    aborts the communicator, which then refuses every later call.

use super::{Call, DeviceBackend};
use crate::algo::Algo;
use crate::error::{Error, Result};
use crate::exchange::{agree, backoff, broadcast_bytes};
use crate::runtime::hip::rccl::{Rccl, RcclComm, RcclUniqueId, LIBRARY_NAMES, MIN_VERSION};
use crate::runtime::hip::stream::HipEvent;
use crate::runtime::Context;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The library a rank must be able to load (named in the reason when one cannot).
pub(crate) const LIBRARY: &str = LIBRARY_NAMES[0];

/// Whether RCCL can be loaded in this process with every entry point (no RCCL call is made).
pub(crate) fn library_present() -> bool {
    Rccl::load().is_ok()
}

/// One rank's RCCL communicator, aborted on any failure.
pub(crate) struct RcclAllreduce {
    comm: RcclComm,
    version: i32,
    timeout: Duration,
    /// Why the communicator was aborted; every later call fails with it.
    aborted: Option<String>,
    /// When the oldest eager call not known to have finished was enqueued.
    pending: Option<Instant>,
    /// Recorded after every eager call.
    done: HipEvent,
}

/// The version check of step 2.
///
/// # Errors
/// [`Error::Unsupported`] below [`MIN_VERSION`], naming the version found.
fn check_version(version: i32) -> Result<i32> {
    if version < MIN_VERSION {
        return Err(Error::Unsupported {
            what: "RCCL allreduce".into(),
            reason: format!(
                "the RCCL found is version code {version}; tpcomm needs 2.14 or newer (non-blocking \
                 communicators, so that set-up and calls are bounded by the timeout): install the rccl of ROCm 5.5 \
                 or newer"
            ),
        });
    }
    Ok(version)
}

/// The broadcast blob of the unique id: 1 and its bytes, or 0 and rank 0's error.
fn id_blob(id: Result<RcclUniqueId>) -> Vec<u8> {
    match id {
        Ok(id) => [&[1u8][..], &id.to_bytes()[..]].concat(),
        Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
    }
}

/// The unique id from the broadcast blob.
///
/// # Errors
/// [`Error::Unsupported`] with rank 0's error when it could not make one.
fn id_from_blob(blob: &[u8]) -> Result<RcclUniqueId> {
    match blob.split_first() {
        Some((1, bytes)) => RcclUniqueId::from_bytes(bytes),
        _ => Err(Error::Unsupported {
            what: "RCCL allreduce".into(),
            reason: format!(
                "rank 0 could not make RCCL's unique id: {}",
                String::from_utf8_lossy(blob.get(1..).unwrap_or(&[]))
            ),
        }),
    }
}

impl RcclAllreduce {
    /// Build an RCCL communicator over the ranks of `comm`, on this rank's GPU (`ctx`).
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options.
    ///
    /// # Errors
    /// On every rank: [`Error::Unsupported`] when two ranks share a GPU or RCCL cannot be
    /// loaded; [`Error::PeerTimeout`] when a rank does not arrive at an agreement;
    /// [`Error::Nccl`] for RCCL's own failures.
    pub(crate) fn new<C: mpi::traits::Communicator>(comm: &C, ctx: &Arc<Context>, timeout: Duration) -> Result<Self> {
        const STEP: &str = "RCCL set-up";
        let rank = comm.rank() as usize;
        let world = comm.size() as usize;
        if let Some((uuid, ranks)) = crate::topology::shared_gpus(comm, ctx, timeout)?.into_iter().next() {
            let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
            return Err(Error::Unsupported {
                what: "RCCL allreduce".into(),
                reason: format!(
                    "ranks {} share GPU {uuid} (duplicate GPU): RCCL needs one rank per GPU",
                    ranks.join(", ")
                ),
            });
        }
        let lib = agree(comm, Rccl::load(), timeout, "loading RCCL")?;
        let version = agree(comm, lib.version().and_then(check_version), timeout, "loading RCCL")?;
        let mut blob = if rank == 0 { id_blob(lib.unique_id()) } else { Vec::new() };
        broadcast_bytes(comm, 0, &mut blob, timeout, STEP)?;
        let id = agree(comm, id_from_blob(&blob), timeout, STEP)?;
        let joined = HipEvent::new(ctx)
            .and_then(|done| RcclComm::init_rank(&lib, ctx, &id, rank, world, timeout).map(|c| (c, done)));
        let (comm, done) = agree(comm, joined, timeout, "ncclCommInitRankConfig")?;
        Ok(RcclAllreduce { comm, version, timeout, aborted: None, pending: None, done })
    }

    /// Ranks in the RCCL communicator.
    pub(crate) fn world_size(&self) -> usize {
        self.comm.world()
    }

    /// The version code of the RCCL in use.
    pub(crate) fn version(&self) -> i32 {
        self.version
    }

    /// Abort with `e` as the reason, and return it.
    fn fail(&mut self, e: Error) -> Error {
        if self.aborted.is_none() {
            self.comm.abort();
            self.aborted = Some(e.to_string());
        }
        e
    }

    /// The refusal of an aborted communicator.
    fn usable(&self) -> Result<()> {
        match &self.aborted {
            Some(cause) => Err(Error::Poisoned { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// RCCL's asynchronous error, then whether the last eager call finished ([`Self::check_pending`]).
    fn progress(&mut self) -> Result<bool> {
        self.usable()?;
        self.comm.async_error().map_err(|e| self.fail(e))?;
        self.check_pending()
    }

    /// Whether the last eager call finished; past the timeout it never will (a peer did not
    /// come): abort, and say so.
    fn check_pending(&mut self) -> Result<bool> {
        let Some(since) = self.pending else { return Ok(true) };
        match self.done.is_complete() {
            Ok(true) => {
                self.pending = None;
                Ok(true)
            }
            Ok(false) if past(since, self.timeout) => {
                Err(self.fail(Error::PeerTimeout { op: "rccl all_reduce", peer: None, waited: since.elapsed() }))
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.fail(e)),
        }
    }
}

/// Whether a call pending since `since` has waited longer than `timeout`.
fn past(since: Instant, timeout: Duration) -> bool {
    since.elapsed() > timeout
}

impl DeviceBackend for RcclAllreduce {
    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()> {
        if algo != Algo::Nccl {
            return Err(Error::Internal(format!("the RCCL backend was asked to run {algo}")));
        }
        self.usable()?;
        if call.len == 0 {
            return Ok(());
        }
        let stream = call.stream.device()?;
        // SAFETY: the pointers are valid for `len` elements (the caller's contract); live
        // communicator and stream.
        let r = unsafe { self.comm.all_reduce(call.input, call.output, call.len, call.dtype, stream) };
        r.map_err(|e| self.fail(e))?;
        if call.capture.is_none() {
            let recorded = self.done.record(stream);
            recorded.map_err(|e| self.fail(e))?;
            self.pending.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    fn poll(&mut self) -> Result<()> {
        self.progress().map(|_| ())
    }

    fn drain(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut polls = 0;
        while !self.progress()? {
            if past(start, timeout) {
                return Err(self.fail(Error::PeerTimeout { op: "rccl (finishing)", peer: None, waited: timeout }));
            }
            backoff(&mut polls);
        }
        Ok(())
    }

    fn abort(&mut self) {
        if self.aborted.is_none() {
            self.comm.abort();
            self.aborted = Some("the group failed or was aborted".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rccl_older_than_2_14_is_unsupported_naming_its_version() {
        assert_eq!(check_version(21400).unwrap(), 21400);
        assert_eq!(check_version(22203).unwrap(), 22203);
        match check_version(21305) {
            Err(Error::Unsupported { reason, .. }) => {
                assert!(reason.contains("21305") && reason.contains("2.14"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_call_is_past_its_timeout_only_after_it() {
        let now = Instant::now();
        assert!(!past(now, Duration::from_secs(60)));
        let long_ago = now.checked_sub(Duration::from_secs(2)).unwrap();
        assert!(past(long_ago, Duration::from_secs(1)));
        assert!(!past(long_ago, Duration::from_secs(10)));
    }

    #[test]
    fn rccl_unique_ids_travel_as_blobs_and_rank_0_failures_are_named() {
        let bytes: Vec<u8> = (0..128).map(|i| (i * 3 + 1) as u8).collect();
        let id = RcclUniqueId::from_bytes(&bytes).unwrap();
        let blob = id_blob(Ok(id));
        assert_eq!((blob.len(), blob[0]), (129, 1));
        assert_eq!(id_from_blob(&blob).unwrap().to_bytes().as_slice(), bytes.as_slice());
        let failed = id_blob(Err(Error::Internal("no network".into())));
        match id_from_blob(&failed) {
            Err(Error::Unsupported { reason, .. }) => assert!(reason.contains("no network"), "{reason}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(matches!(id_from_blob(&[]), Err(Error::Unsupported { .. })));
        assert!(matches!(id_from_blob(&blob[..100]), Err(Error::Internal(_))), "a cut id");
    }
}
