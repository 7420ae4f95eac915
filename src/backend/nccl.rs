//! NCCL allreduce through cudarc's raw bindings (`cudarc::nccl::{result, sys}`): large device
//! messages, ranks on several nodes, GPUs without P2P.
//!
//! cudarc's safe `Comm` cannot poll asynchronous errors, build a non-blocking communicator or
//! abort, so this file owns the `ncclComm_t` itself. Every wait is bounded by the timeout:
//!
//! 1. Before NCCL is touched, every rank's GPU UUID is gathered; two ranks on one GPU make
//!    [`Error::Unsupported`] on every rank (NCCL refuses them with "Duplicate GPU detected").
//! 2. libnccl is loaded at run time (cudarc's dynamic loading); where it is missing, every rank
//!    gets [`Error::Unsupported`] saying what to install, and the host paths are unaffected.
//! 3. Rank 0 makes the unique id and broadcasts it over MPI.
//! 4. `ncclCommInitRankConfig` with `blocking = 0`, then `ncclCommGetAsyncError` is polled until
//!    success or the deadline; on timeout the communicator is aborted and the call returns
//!    [`Error::PeerTimeout`].
//! 5. Each allreduce only enqueues `ncclAllReduce` on the caller's stream (NCCL supports CUDA
//!    graphs, so captured calls are NCCL nodes). After an eager call an event is recorded; `poll`
//!    reads NCCL's asynchronous error and, while that event has not completed, how long the call
//!    has been pending: past the timeout the communicator is aborted (a peer never came) and the
//!    call's error is [`Error::PeerTimeout`]. A failure aborts the communicator, which then
//!    refuses every later call.
//!
//! Every step that can fail on one rank ends with an agreement over MPI, so a failure on one
//! rank is an error on every rank.

use super::{Call, DeviceBackend};
use crate::algo::Algo;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::{agree, backoff, broadcast_bytes};
use cudarc::driver::{CudaContext, CudaEvent};
use cudarc::nccl::sys;
use std::ffi::{c_int, c_void, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The NCCL version (`NCCL_VERSION(major, minor, 0)` = major * 10000 + minor * 100) of the
/// headers cudarc's bindings were made from; written into `ncclConfig_t.version` as
/// `NCCL_CONFIG_INITIALIZER` does.
const BINDINGS_VERSION: u32 = if cfg!(feature = "cuda-13000") {
    22800
} else if cfg!(feature = "cuda-12080") {
    22600
} else {
    22400
};

/// Oldest libnccl accepted: non-blocking communicators and `ncclConfig_t` came with 2.14.
pub(crate) const MIN_VERSION: i32 = 21400;

/// The library every rank must be able to load.
pub(crate) const LIBRARY: &str = "libnccl.so.2";

/// What to tell a user whose machine has no libnccl.
const INSTALL_HINT: &str = "libnccl.so.2 was not found: install NCCL 2.14 or newer (apt-get install libnccl2, or \
                            pip install nvidia-nccl-cu13 / nvidia-nccl-cu12) and put the folder holding \
                            libnccl.so.2 on LD_LIBRARY_PATH";

/// One rank's NCCL communicator, built non-blocking and aborted on any failure.
pub(crate) struct NcclAllreduce {
    comm: sys::ncclComm_t,
    world: usize,
    version: i32,
    timeout: Duration,
    /// Why the communicator was aborted; every later call fails with it.
    aborted: Option<String>,
    /// Completion of the last eager call and when it was enqueued.
    pending: Option<Instant>,
    done: CudaEvent,
    // Keeps the device's primary context alive until the communicator is gone.
    _ctx: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every call here takes `&mut self`.
unsafe impl Send for NcclAllreduce {}

/// Whether libnccl can be loaded in this process (no NCCL call is made).
pub(crate) fn library_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { sys::is_culib_present() }
}

/// NCCL's element type for ours.
fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
    match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::F64 => sys::ncclDataType_t::ncclFloat64,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

/// `ncclConfig_t` as `NCCL_CONFIG_INITIALIZER` fills it (every option undefined, so NCCL picks
/// its defaults), except `blocking = 0`.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
                                     // SAFETY: the struct holds only integers and pointers, for which all zeros is valid; the
                                     // pointer fields stay null (NCCL_CONFIG_UNDEF_PTR).
    let mut c: sys::ncclConfig_t = unsafe { std::mem::zeroed() };
    c.size = size_of::<sys::ncclConfig_t>();
    c.magic = 0xcafe_beef;
    c.version = BINDINGS_VERSION;
    c.blocking = 0;
    for field in [&mut c.cgaClusterSize, &mut c.minCTAs, &mut c.maxCTAs, &mut c.splitShare] {
        *field = UNDEF;
    }
    #[cfg(any(feature = "cuda-13000", feature = "cuda-12080"))]
    {
        c.trafficClass = UNDEF;
    }
    #[cfg(feature = "cuda-13000")]
    for field in [
        &mut c.collnetEnable,
        &mut c.CTAPolicy,
        &mut c.shrinkShare,
        &mut c.nvlsCTAs,
        &mut c.nChannelsPerNetPeer,
        &mut c.nvlinkCentricSched,
    ] {
        *field = UNDEF;
    }
    c
}

/// [`Error::Nccl`] for `code`, with NCCL's text for it and its last error message.
fn nccl_error(op: &'static str, code: sys::ncclResult_t) -> Error {
    // SAFETY: both return static or thread-local NUL-terminated strings (or null); the
    // communicator argument of ncclGetLastError is unused and may be null.
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let what = text(unsafe { sys::ncclGetErrorString(code) });
    let last = text(unsafe { sys::ncclGetLastError(std::ptr::null_mut()) });
    let detail = if last.is_empty() { what } else { format!("{what}; last error: {last}") };
    Error::Nccl { op, code: format!("{code:?}"), detail }
}

/// Load libnccl and check its version, on this rank.
fn load() -> Result<i32> {
    if !library_present() {
        return Err(Error::Unsupported { what: "NCCL allreduce".into(), reason: INSTALL_HINT.into() });
    }
    let version = cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e.0))?;
    if version < MIN_VERSION {
        return Err(Error::Unsupported {
            what: "NCCL allreduce".into(),
            reason: format!("the libnccl found is version code {version}; tpcomm needs 2.14 or newer ({INSTALL_HINT})"),
        });
    }
    Ok(version)
}

impl NcclAllreduce {
    /// Build an NCCL communicator over the ranks of `comm`, on this rank's GPU (`ctx`).
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options; each rank's context must be current.
    ///
    /// # Errors
    /// On every rank: [`Error::Unsupported`] when two ranks share a GPU (naming them and the
    /// GPU) or libnccl cannot be loaded (saying what to install); [`Error::PeerTimeout`] when
    /// initialisation does not finish within the timeout (the communicator is aborted);
    /// [`Error::Nccl`] for NCCL's own failures.
    pub(crate) fn new<C: mpi::traits::Communicator>(
        comm: &C,
        ctx: &Arc<CudaContext>,
        timeout: Duration,
    ) -> Result<Self> {
        const STEP: &str = "NCCL set-up";
        let rank = comm.rank() as usize;
        let world = comm.size() as usize;
        // 1. Shared GPUs, before NCCL is touched: the verdict comes from gathered data, so it is
        //    the same on every rank.
        if let Some((uuid, ranks)) = crate::topology::shared_gpus(comm, ctx, timeout)?.into_iter().next() {
            let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
            return Err(Error::Unsupported {
                what: "NCCL allreduce".into(),
                reason: format!(
                    "ranks {} share GPU {uuid} (duplicate GPU): NCCL needs one rank per GPU; give each rank its own \
                     GPU, or leave TPCOMM_ALGO unset so the custom kernels, which run ranks sharing a GPU \
                     under MPS, serve the calls",
                    ranks.join(", ")
                ),
            });
        }
        // 2. The library, on every rank.
        let version = agree(comm, load(), timeout, "loading NCCL")?;
        // 3. The unique id: 1 and the id's bytes, or 0 and rank 0's error.
        let mut blob = Vec::new();
        if rank == 0 {
            blob = match cudarc::nccl::result::get_uniqueid() {
                Ok(id) => [&[1u8][..], &id.internal.map(|c| c as u8)[..]].concat(),
                Err(e) => [&[0u8][..], nccl_error("ncclGetUniqueId", e.0).to_string().as_bytes()].concat(),
            };
        }
        broadcast_bytes(comm, 0, &mut blob, timeout, STEP)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        match blob.split_first() {
            Some((1, bytes)) if bytes.len() == id.internal.len() => {
                for (dst, src) in id.internal.iter_mut().zip(bytes) {
                    *dst = *src as std::ffi::c_char;
                }
            }
            _ => {
                return Err(Error::Unsupported {
                    what: "NCCL allreduce".into(),
                    reason: format!(
                        "rank 0 could not make NCCL's unique id: {}",
                        String::from_utf8_lossy(blob.get(1..).unwrap_or(&[]))
                    ),
                })
            }
        }
        // 4. Non-blocking init, polled against the deadline.
        let deadline = Instant::now() + timeout;
        let local = Self::init(ctx, id, rank, world, version, timeout, deadline);
        agree(comm, local, timeout, "ncclCommInitRankConfig")
    }

    fn init(
        ctx: &Arc<CudaContext>,
        id: sys::ncclUniqueId,
        rank: usize,
        world: usize,
        version: i32,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Self> {
        const OP: &str = "ncclCommInitRankConfig";
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: valid out pointer and config; the id came from ncclGetUniqueId on rank 0.
        let r = unsafe { sys::ncclCommInitRankConfig(&mut raw, world as c_int, id, rank as c_int, &mut config) };
        if !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            let e = nccl_error(OP, r);
            if !raw.is_null() {
                // SAFETY: a communicator handle NCCL returned; not used afterwards.
                unsafe { sys::ncclCommAbort(raw) };
            }
            return Err(e);
        }
        if raw.is_null() {
            return Err(Error::Internal(format!("{OP} returned {r:?} but no communicator")));
        }
        let done = match ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)) {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: a communicator handle NCCL returned; not used afterwards.
                unsafe { sys::ncclCommAbort(raw) };
                return Err(Error::Cuda { op: "cuEventCreate(NCCL completion)", source: e });
            }
        };
        let mut this =
            NcclAllreduce { comm: raw, world, version, timeout, aborted: None, pending: None, done, _ctx: ctx.clone() };
        let _ = rank;
        this.wait_ready(OP, deadline)?;
        Ok(this)
    }

    /// Ranks in the NCCL communicator.
    pub(crate) fn world_size(&self) -> usize {
        self.world
    }

    /// The version code of the libnccl in use (`22803` for 2.28.3).
    pub(crate) fn version(&self) -> i32 {
        self.version
    }

    /// Abort the communicator (device work of NCCL stops; resources are freed) and remember why.
    fn abort(&mut self, why: String) {
        if self.aborted.is_none() {
            // SAFETY: the handle is live (not aborted before) and not used after this.
            unsafe { sys::ncclCommAbort(self.comm) };
            self.aborted = Some(why);
        }
    }

    /// Abort with `e` as the reason, and return it.
    fn fail(&mut self, e: Error) -> Error {
        self.abort(e.to_string());
        e
    }

    /// Poll `ncclCommGetAsyncError` until NCCL leaves `ncclInProgress`; abort on error or at
    /// `deadline`.
    fn wait_ready(&mut self, op: &'static str, deadline: Instant) -> Result<()> {
        let mut polls = 0;
        loop {
            match self.async_state(op)? {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                code => return Err(self.fail(nccl_error(op, code))),
            }
            if Instant::now() >= deadline {
                return Err(self.fail(Error::PeerTimeout { op, peer: None, waited: self.timeout }));
            }
            backoff(&mut polls);
        }
    }

    /// The communicator's asynchronous state; aborts when it cannot be read.
    fn async_state(&mut self, op: &'static str) -> Result<sys::ncclResult_t> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: live communicator, valid out pointer.
        let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(self.fail(nccl_error(op, r)));
        }
        Ok(state)
    }

    /// Fail (and abort) when NCCL holds an asynchronous error; work still in progress is fine.
    fn check_async(&mut self, op: &'static str) -> Result<()> {
        match self.async_state(op)? {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            code => Err(self.fail(nccl_error(op, code))),
        }
    }

    /// The refusal of an aborted communicator.
    fn usable(&self) -> Result<()> {
        match &self.aborted {
            Some(cause) => Err(Error::Poisoned { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Whether the last eager call finished; past the timeout it never will (a peer did not
    /// come): abort, and say so.
    fn check_pending(&mut self) -> Result<bool> {
        const OP: &str = "nccl all_reduce";
        let Some(since) = self.pending else { return Ok(true) };
        match self.done.try_is_complete() {
            Ok(true) => {
                self.pending = None;
                Ok(true)
            }
            Ok(false) if since.elapsed() > self.timeout => {
                Err(self.fail(Error::PeerTimeout { op: OP, peer: None, waited: since.elapsed() }))
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.fail(Error::Cuda { op: "cuEventQuery(NCCL completion)", source: e })),
        }
    }
}

impl DeviceBackend for NcclAllreduce {
    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()> {
        const OP: &str = "nccl all_reduce";
        if algo != Algo::Nccl {
            return Err(Error::Internal(format!("the NCCL backend was asked to run {algo}")));
        }
        self.usable()?;
        if call.len == 0 {
            return Ok(());
        }
        let stream = call.stream.device()?;
        let deadline = Instant::now() + self.timeout;
        // SAFETY: pointers valid for `len` elements (caller); live communicator and stream.
        let r = unsafe {
            sys::ncclAllReduce(
                call.input as *const c_void,
                call.output as *mut c_void,
                call.len,
                nccl_dtype(call.dtype),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        if !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            return Err(self.fail(nccl_error(OP, r)));
        }
        // A non-blocking communicator may still be enqueueing (host work, bounded).
        self.wait_ready(OP, deadline)?;
        if call.capture.is_none() {
            self.done.record(stream).map_err(|e| self.fail(Error::Cuda { op: "cuEventRecord(NCCL)", source: e }))?;
            self.pending.get_or_insert_with(Instant::now);
            if self.done.try_is_complete().unwrap_or(false) {
                self.pending = None;
            }
        }
        Ok(())
    }

    fn poll(&mut self) -> Result<()> {
        self.usable()?;
        self.check_async("nccl (asynchronous error)")?;
        self.check_pending().map(|_| ())
    }

    fn abort(&mut self) {
        NcclAllreduce::abort(self, "the group failed or was aborted".into());
    }

    fn drain(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut polls = 0;
        loop {
            self.usable()?;
            self.check_async("nccl (finishing)")?;
            if self.check_pending()? {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(self.fail(Error::PeerTimeout { op: "nccl (finishing)", peer: None, waited: timeout }));
            }
            backoff(&mut polls);
        }
    }
}

impl Drop for NcclAllreduce {
    /// Finalise (flush outstanding work, bounded by the timeout), then destroy; abort where
    /// finalisation fails or does not finish in time. Never panics.
    fn drop(&mut self) {
        if self.aborted.is_some() {
            return;
        }
        // SAFETY: live communicator, not used by anything else any more.
        let r = unsafe { sys::ncclCommFinalize(self.comm) };
        let finished = matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress)
            && self.wait_ready("ncclCommFinalize", Instant::now() + self.timeout).is_ok();
        if finished {
            // SAFETY: finalised above; the handle is not used after this.
            unsafe { sys::ncclCommDestroy(self.comm) };
        } else {
            self.abort("dropped".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_nccl_config_initializer_but_non_blocking() {
        let c = nonblocking_config();
        assert_eq!(c.size, size_of::<sys::ncclConfig_t>());
        assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, BINDINGS_VERSION, 0));
        assert_eq!(
            (c.cgaClusterSize, c.minCTAs, c.maxCTAs, c.splitShare),
            (c_int::MIN, c_int::MIN, c_int::MIN, c_int::MIN)
        );
        assert!(c.netName.is_null());
        #[cfg(feature = "cuda-13000")]
        {
            assert!(c.commName.is_null());
            assert_eq!((c.trafficClass, c.CTAPolicy, c.nvlinkCentricSched), (c_int::MIN, c_int::MIN, c_int::MIN));
        }
        assert!(BINDINGS_VERSION >= MIN_VERSION as u32);
    }

    #[test]
    fn every_dtype_has_an_nccl_type() {
        let got: Vec<_> = [DType::F32, DType::F64, DType::F16, DType::BF16].map(nccl_dtype).to_vec();
        assert_eq!(
            got,
            [
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclDataType_t::ncclFloat64,
                sys::ncclDataType_t::ncclFloat16,
                sys::ncclDataType_t::ncclBfloat16
            ]
        );
    }

    #[test]
    fn a_missing_library_says_what_to_install() {
        // Meaningful only where no libnccl is installed (CI, the development machine); where one
        // is, loading must succeed with a usable version instead.
        match load() {
            Err(Error::Unsupported { reason, .. }) => {
                assert!(!library_present());
                assert!(reason.contains("libnccl.so.2") && reason.contains("LD_LIBRARY_PATH"), "{reason}");
            }
            Ok(version) => assert!(library_present() && version >= MIN_VERSION),
            Err(e) => panic!("unexpected error loading NCCL: {e}"),
        }
    }
}
