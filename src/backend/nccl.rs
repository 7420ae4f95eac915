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
//! 5. Each eager allreduce enqueues `ncclAllReduce` on the caller's stream, then polls stream
//!    completion and the asynchronous error against the deadline; a failure aborts the
//!    communicator, which then refuses every later call. Inside stream capture the call is
//!    only enqueued (NCCL supports CUDA graphs).
//!
//! Every step that can fail on one rank ends with an agreement over MPI, so a failure on one
//! rank is an error on every rank.

use crate::bootstrap::{agree, broadcast_bytes};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream};
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
pub const MIN_VERSION: i32 = 21400;

/// What to tell a user whose machine has no libnccl.
const INSTALL_HINT: &str = "libnccl.so.2 was not found: install NCCL 2.14 or newer (apt-get install libnccl2, or \
                            pip install nvidia-nccl-cu13 / nvidia-nccl-cu12) and put the folder holding \
                            libnccl.so.2 on LD_LIBRARY_PATH";

/// Settings of an [`NcclAllreduce`].
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// Longest wait for initialisation, for one eager call, or for finalisation at drop.
    pub timeout: Duration,
}

/// One rank's NCCL communicator, built non-blocking and aborted on any failure.
pub struct NcclAllreduce {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    version: i32,
    timeout: Duration,
    /// Why the communicator was aborted; every later call fails with it.
    aborted: Option<String>,
    // Keeps the device's primary context alive until the communicator is gone.
    _ctx: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every call here takes `&mut self`.
unsafe impl Send for NcclAllreduce {}

/// Whether libnccl can be loaded in this process (no NCCL call is made).
pub fn library_present() -> bool {
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

/// Poll briefly at first (calls finish in microseconds), then yield, then sleep.
fn backoff(polls: &mut u32) {
    *polls += 1;
    if *polls < 200 {
        std::hint::spin_loop();
    } else if *polls < 20_000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
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
    pub fn new<C: mpi::traits::Communicator>(comm: &C, ctx: &Arc<CudaContext>, opts: &NcclOptions) -> Result<Self> {
        let rank = comm.rank() as usize;
        let world = comm.size() as usize;
        // 1. Shared GPUs, before NCCL is touched: the verdict comes from gathered data, so it is
        //    the same on every rank.
        if let Some((uuid, ranks)) = crate::topology::shared_gpus(comm, ctx).into_iter().next() {
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
        let version = agree(comm, load(), "loading NCCL")?;
        // 3. The unique id: 1 and the id's bytes, or 0 and rank 0's error.
        let mut blob = Vec::new();
        if rank == 0 {
            blob = match cudarc::nccl::result::get_uniqueid() {
                Ok(id) => [&[1u8][..], &id.internal.map(|c| c as u8)[..]].concat(),
                Err(e) => [&[0u8][..], nccl_error("ncclGetUniqueId", e.0).to_string().as_bytes()].concat(),
            };
        }
        broadcast_bytes(comm, 0, &mut blob);
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
        let deadline = Instant::now() + opts.timeout;
        let local = Self::init(ctx, id, rank, world, version, opts.timeout, deadline);
        agree(comm, local, "ncclCommInitRankConfig")
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
        let mut this = NcclAllreduce { comm: raw, rank, world, version, timeout, aborted: None, _ctx: ctx.clone() };
        this.wait_ready(OP, deadline)?;
        Ok(this)
    }

    /// This rank in the NCCL communicator.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the NCCL communicator.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The version code of the libnccl in use (`22803` for 2.28.3).
    pub fn version(&self) -> i32 {
        self.version
    }

    /// Why the communicator was aborted, if it was (it then refuses every call).
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.as_deref()
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

    /// Report an asynchronous NCCL error (for example from a replayed graph), aborting the
    /// communicator if there is one.
    ///
    /// # Errors
    /// [`Error::Nccl`]; [`Error::Poisoned`] once aborted.
    pub fn check_error(&mut self) -> Result<()> {
        const OP: &str = "nccl (asynchronous error)";
        if let Some(cause) = &self.aborted {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        self.check_async(OP)
    }

    /// Fail (and abort) when NCCL holds an asynchronous error; work still in progress is fine.
    fn check_async(&mut self, op: &'static str) -> Result<()> {
        match self.async_state(op)? {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            code => Err(self.fail(nccl_error(op, code))),
        }
    }

    /// Sum `len` elements of `dtype` at `input` over all ranks into `output`, on `stream`.
    /// Outside stream capture the call waits (bounded by the timeout) until the result is
    /// there; during capture it is only recorded.
    ///
    /// # Safety
    /// `input` and `output` must be device memory of this rank's GPU valid for `len` elements
    /// of `dtype`, not written by other work while the call (or a replay of its capture) runs.
    ///
    /// # Collective
    /// Every rank, same `len` and `dtype`, in the same order.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] when the call does not finish within the timeout;
    /// [`Error::Nccl`] for NCCL's failures; [`Error::Cuda`] when the stream fails. After any of
    /// them the communicator is aborted and later calls return [`Error::Poisoned`].
    pub unsafe fn all_reduce(
        &mut self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        input: u64,
        output: u64,
        len: usize,
    ) -> Result<()> {
        const OP: &str = "nccl all_reduce";
        if let Some(cause) = &self.aborted {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        if len == 0 {
            return Ok(());
        }
        let capturing = crate::cuda::is_capturing(stream)?;
        let deadline = Instant::now() + self.timeout;
        // SAFETY: pointers valid for `len` elements (caller); live communicator and stream.
        let r = unsafe {
            sys::ncclAllReduce(
                input as *const c_void,
                output as *mut c_void,
                len,
                nccl_dtype(dtype),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        if !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            return Err(self.fail(nccl_error(OP, r)));
        }
        // A non-blocking communicator may still be enqueueing.
        self.wait_ready(OP, deadline)?;
        if capturing {
            return Ok(());
        }
        let mut polls = 0;
        loop {
            match crate::cuda::stream_done(stream, "cuStreamQuery(nccl all_reduce)") {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(self.fail(e)),
            }
            self.check_async(OP)?;
            if Instant::now() >= deadline {
                return Err(self.fail(Error::PeerTimeout { op: OP, peer: None, waited: self.timeout }));
            }
            backoff(&mut polls);
        }
        self.check_async(OP)
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
