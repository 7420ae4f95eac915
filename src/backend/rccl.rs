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
//! 4. `ncclCommInitRank`, which **blocks** until every rank joined: unlike the NCCL backend's
//!    non-blocking set-up, this wait is not bounded by the timeout (every rank has passed the
//!    agreement of step 2 when it starts, so only a rank that dies in between can make it hang);
//! 5. each allreduce only enqueues `ncclAllReduce` on the caller's stream; `poll` reads RCCL's
//!    asynchronous error and aborts the communicator on one. A call whose peer never came is not
//!    aborted after the timeout as the NCCL backend's are (no completion event is tracked yet).

use super::{Call, DeviceBackend};
use crate::algo::Algo;
use crate::error::{Error, Result};
use crate::exchange::{agree, broadcast_bytes};
use crate::runtime::hip::rccl::{Rccl, RcclComm, RcclUniqueId, LIBRARY_NAMES};
use crate::runtime::Context;
use std::sync::Arc;
use std::time::Duration;

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
    /// Why the communicator was aborted; every later call fails with it.
    aborted: Option<String>,
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
        let version = agree(comm, lib.version(), timeout, "loading RCCL")?;
        let mut blob = if rank == 0 { id_blob(lib.unique_id()) } else { Vec::new() };
        broadcast_bytes(comm, 0, &mut blob, timeout, STEP)?;
        let id = agree(comm, id_from_blob(&blob), timeout, STEP)?;
        let joined = RcclComm::init_rank(&lib, ctx, &id, rank, world);
        let comm = agree(comm, joined, timeout, "ncclCommInitRank")?;
        Ok(RcclAllreduce { comm, version, aborted: None })
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
        r.map_err(|e| self.fail(e))
    }

    fn poll(&mut self) -> Result<()> {
        self.usable()?;
        self.comm.async_error().map_err(|e| self.fail(e))
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
