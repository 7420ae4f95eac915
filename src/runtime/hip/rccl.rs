//! RCCL, NCCL's ROCm counterpart, loaded at run time: what `backend/nccl.rs` gets from cudarc's
//! dynamic loading of libnccl, for HIP.
//!
//! [`Rccl::load`] opens `librccl.so.1` (or `librccl.so`) with `dlopen` and resolves the few
//! entry points tpcomm calls; where the library or one of them is missing, the answer is
//! [`Error::Unsupported`] saying what to install, so a machine without RCCL builds and runs
//! every other path. RCCL keeps NCCL's API and ABI (the `nccl*` names, `ncclUniqueId` of 128
//! bytes, the same enum values; the tests check the values against cudarc's NCCL bindings), and
//! its failures are [`Error::Nccl`] with the code's name and RCCL's text for it.
//!
//! [`RcclComm`] owns one communicator, built as the NCCL backend builds its own: non-blocking
//! (`ncclCommInitRankConfig` with `blocking = 0`), then `ncclCommGetAsyncError` is polled until
//! RCCL leaves `ncclInProgress` or the deadline passes, when the communicator is aborted and the
//! answer is [`Error::PeerTimeout`]. So no wait on a peer is unbounded. That needs RCCL 2.14 or
//! newer (ROCm 5.5 and later ship it), where `ncclConfig_t` and non-blocking communicators
//! appeared; older libraries are [`Error::Unsupported`].

use super::device::HipDevice;
use super::stream::HipStream;
use crate::dtype::DType;
use crate::error::{Error, Result};
use hip_runtime_sys::hipStream_t;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Oldest RCCL accepted (its `ncclGetVersion` code): non-blocking communicators and
/// `ncclConfig_t` came with NCCL 2.14, which RCCL follows.
pub const MIN_VERSION: i32 = 21400;

/// The names tried, in order.
pub const LIBRARY_NAMES: [&str; 2] = ["librccl.so.1", "librccl.so"];

/// What to tell a user whose machine has no RCCL.
const INSTALL_HINT: &str = "install RCCL (ROCm's rccl package) and put the folder holding librccl.so.1 on \
                            LD_LIBRARY_PATH";

/// Bytes of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: the bytes rank 0 makes and every rank passes to [`RcclComm::init_rank`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RcclUniqueId {
    /// The opaque bytes.
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

impl RcclUniqueId {
    /// The id as bytes, to send over MPI.
    pub fn to_bytes(self) -> [u8; UNIQUE_ID_BYTES] {
        self.internal.map(|c| c as u8)
    }

    /// The id from the bytes [`RcclUniqueId::to_bytes`] gave.
    ///
    /// # Errors
    /// [`Error::Internal`] when `bytes` is not [`UNIQUE_ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bytes: &[u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
            Error::Internal(format!("an RCCL unique id is {UNIQUE_ID_BYTES} bytes, not {}", bytes.len()))
        })?;
        Ok(RcclUniqueId { internal: bytes.map(|b| b as c_char) })
    }
}

/// `ncclComm_t`.
type RawComm = *mut c_void;
/// `ncclGetUniqueId`.
type GetUniqueId = unsafe extern "C" fn(*mut RcclUniqueId) -> c_int;
/// `ncclCommInitRankConfig`.
type CommInitRankConfig = unsafe extern "C" fn(*mut RawComm, c_int, RcclUniqueId, c_int, *mut RcclConfig) -> c_int;

/// `ncclConfig_t` as NCCL 2.14 declares it (the first version that has it). Later versions
/// append fields and accept a caller's older, shorter struct: they read `size` bytes and take
/// their defaults for the rest, which is how a header-less caller can pass one.
#[repr(C)]
struct RcclConfig {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
}

/// `NCCL_CONFIG_INITIALIZER` of NCCL 2.14 (every option undefined, so RCCL picks its
/// defaults), except `blocking = 0`.
fn nonblocking_config() -> RcclConfig {
    const UNDEF: c_int = c_int::MIN; // NCCL_CONFIG_UNDEF_INT
    RcclConfig {
        size: size_of::<RcclConfig>(),
        magic: 0xcafe_beef,
        version: MIN_VERSION as u32,
        blocking: 0,
        cga_cluster_size: UNDEF,
        min_ctas: UNDEF,
        max_ctas: UNDEF,
        net_name: std::ptr::null(), // NCCL_CONFIG_UNDEF_PTR
    }
}
/// `ncclAllReduce`.
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, hipStream_t) -> c_int;
/// `ncclCommAbort` and `ncclCommDestroy`.
type CommEnd = unsafe extern "C" fn(RawComm) -> c_int;
/// `ncclGetErrorString`.
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
/// `ncclCommGetAsyncError`.
type CommGetAsyncError = unsafe extern "C" fn(RawComm, *mut c_int) -> c_int;
/// `ncclGetVersion`.
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// `ncclSuccess`.
const SUCCESS: c_int = 0;
/// `ncclInProgress`: a non-blocking communicator is still working on the last request.
const IN_PROGRESS: c_int = 7;
/// `ncclSum`.
const SUM: c_int = 0;

/// The name of an `ncclResult_t` value.
fn result_name(code: c_int) -> String {
    const NAMES: [&str; 8] = [
        "ncclSuccess",
        "ncclUnhandledCudaError",
        "ncclSystemError",
        "ncclInternalError",
        "ncclInvalidArgument",
        "ncclInvalidUsage",
        "ncclRemoteError",
        "ncclInProgress",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("ncclResult {code}"), |n| n.to_string())
}

/// RCCL's `ncclDataType_t` value for `dtype` (NCCL's values).
fn rccl_dtype(dtype: DType) -> c_int {
    match dtype {
        DType::F16 => 6,
        DType::F32 => 7,
        DType::F64 => 8,
        DType::BF16 => 9,
    }
}

/// The last `dlerror` text (after a failed `dlopen` or `dlsym`).
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call on
    // this thread; it is copied at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "no error text".into()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The loaded library and the entry points tpcomm calls; closed on drop.
pub struct Rccl {
    handle: *mut c_void,
    library: String,
    get_unique_id: GetUniqueId,
    comm_init_rank_config: CommInitRankConfig,
    all_reduce: AllReduce,
    comm_abort: CommEnd,
    comm_destroy: CommEnd,
    get_error_string: GetErrorString,
    comm_get_async_error: CommGetAsyncError,
    get_version: GetVersion,
}

// SAFETY: the handle and function pointers are process-wide and immutable once resolved; RCCL's
// functions may be called from any thread.
unsafe impl Send for Rccl {}
// SAFETY: as above.
unsafe impl Sync for Rccl {}

impl Rccl {
    /// Load RCCL under one of [`LIBRARY_NAMES`].
    ///
    /// # Errors
    /// [`Error::Unsupported`] saying what to install when no name loads or the library lacks
    /// an entry point.
    pub fn load() -> Result<Arc<Self>> {
        Self::load_from(&LIBRARY_NAMES)
    }

    /// Load the first of `names` that `dlopen` finds, and resolve the entry points.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming every library tried and `dlopen`'s answer, or the missing
    /// entry point.
    pub fn load_from(names: &[&str]) -> Result<Arc<Self>> {
        let unsupported = |reason: String| Error::Unsupported { what: "RCCL allreduce".into(), reason };
        let mut tried = Vec::new();
        for &name in names {
            let Ok(cname) = CString::new(name) else {
                tried.push(format!("{name:?}: a NUL byte in the name"));
                continue;
            };
            // SAFETY: a NUL-terminated name; loading runs the library's initialisers, which is
            // what loading RCCL means.
            let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                tried.push(format!("{name}: {}", dl_error()));
                continue;
            }
            return Self::resolve(handle, name).map(Arc::new).map_err(|missing| {
                // SAFETY: opened above; nothing resolved from it is kept.
                unsafe { libc::dlclose(handle) };
                unsupported(format!(
                    "{name} was loaded but lacks {missing}: it is not RCCL, or too old; {INSTALL_HINT}"
                ))
            });
        }
        Err(unsupported(format!("RCCL could not be loaded ({}): {INSTALL_HINT}", tried.join("; "))))
    }

    /// Resolve every entry point of `handle`, or say which one is missing (and `dlsym`'s answer).
    fn resolve(handle: *mut c_void, library: &str) -> std::result::Result<Self, String> {
        /// The function `name` of `handle`, as the function pointer type `F`.
        fn symbol<F: Copy>(handle: *mut c_void, name: &CStr) -> std::result::Result<F, String> {
            const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
            // SAFETY: a live handle and a NUL-terminated name.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                return Err(format!("{} ({})", name.to_string_lossy(), dl_error()));
            }
            // SAFETY: `F` is the function pointer type of the C declaration of `name` (the types
            // above follow nccl.h), of pointer size (asserted).
            Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
        }
        Ok(Rccl {
            handle,
            library: library.to_string(),
            get_unique_id: symbol(handle, c"ncclGetUniqueId")?,
            comm_init_rank_config: symbol(handle, c"ncclCommInitRankConfig")?,
            all_reduce: symbol(handle, c"ncclAllReduce")?,
            comm_abort: symbol(handle, c"ncclCommAbort")?,
            comm_destroy: symbol(handle, c"ncclCommDestroy")?,
            get_error_string: symbol(handle, c"ncclGetErrorString")?,
            comm_get_async_error: symbol(handle, c"ncclCommGetAsyncError")?,
            get_version: symbol(handle, c"ncclGetVersion")?,
        })
    }

    /// The name the library was loaded under.
    #[cfg(test)]
    pub fn library(&self) -> &str {
        &self.library
    }

    /// [`Error::Nccl`] for RCCL's `code` from `op`, with RCCL's text for it.
    fn error(&self, op: &'static str, code: c_int) -> Error {
        // SAFETY: ncclGetErrorString takes any code and returns a static NUL-terminated string
        // (or null).
        let p = unsafe { (self.get_error_string)(code) };
        let text = if p.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated, static (above).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Error::Nccl { op, code: result_name(code), detail: format!("{text} (RCCL, {})", self.library) }
    }

    /// `Ok` for `ncclSuccess`, else the error of `code`.
    fn check(&self, op: &'static str, code: c_int) -> Result<()> {
        if code == SUCCESS {
            Ok(())
        } else {
            Err(self.error(op, code))
        }
    }

    /// The library's version code (`ncclGetVersion`: major * 10000 + minor * 100 + patch).
    ///
    /// # Errors
    /// [`Error::Nccl`] when RCCL does not answer.
    pub fn version(&self) -> Result<i32> {
        let mut v: c_int = 0;
        // SAFETY: a valid out pointer.
        self.check("ncclGetVersion", unsafe { (self.get_version)(&mut v) })?;
        Ok(v)
    }

    /// A new unique id (`ncclGetUniqueId`), made on one rank and sent to the others.
    ///
    /// # Errors
    /// [`Error::Nccl`] when RCCL cannot make one (no network interface, for example).
    pub fn unique_id(&self) -> Result<RcclUniqueId> {
        let mut id = RcclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: a valid out pointer of the C type's size.
        self.check("ncclGetUniqueId", unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }
}

impl Drop for Rccl {
    fn drop(&mut self) {
        // SAFETY: opened in `load_from`; every communicator holds the library, so none
        // outlives it. A failure leaves the library loaded, which is harmless.
        unsafe { libc::dlclose(self.handle) };
    }
}

/// One rank's RCCL communicator, destroyed (or aborted) on drop.
pub struct RcclComm {
    lib: Arc<Rccl>,
    device: Arc<HipDevice>,
    raw: RawComm,
    world: usize,
    /// The wait limit of set-up and of each request (a non-blocking communicator may still be
    /// enqueueing when a call returns).
    timeout: Duration,
    aborted: bool,
}

// SAFETY: an RCCL communicator may be used from any thread as long as calls on it do not
// overlap; every call here takes `&mut self`.
unsafe impl Send for RcclComm {}

/// `rank` and `world` as RCCL takes them.
///
/// # Errors
/// [`Error::InvalidArgument`] when `rank` is not below `world` or `world` exceeds `c_int`.
fn check_ranks(rank: usize, world: usize) -> Result<(c_int, c_int)> {
    match (c_int::try_from(rank), c_int::try_from(world)) {
        (Ok(r), Ok(w)) if rank < world => Ok((r, w)),
        _ => Err(Error::invalid("RcclComm::init_rank", format!("rank {rank} of {world}"))),
    }
}

impl RcclComm {
    /// Join the communicator of `world` ranks named by `id`, as rank `rank`, on `device`
    /// (`ncclCommInitRankConfig`, non-blocking), waiting at most `timeout` for every rank.
    ///
    /// # Collective
    /// Every rank, with the same `id` and `world`; the call returns once all have joined.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a rank outside the world; [`Error::Unsupported`] where
    /// HIP can use no AMD GPU; [`Error::PeerTimeout`] when not every rank joined in time (the
    /// communicator is aborted); [`Error::Nccl`] for RCCL's failures.
    pub fn init_rank(
        lib: &Arc<Rccl>,
        device: &Arc<HipDevice>,
        id: &RcclUniqueId,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self> {
        const OP: &str = "ncclCommInitRankConfig";
        let (r, w) = check_ranks(rank, world)?;
        device.bind()?;
        let deadline = Instant::now() + timeout;
        let mut raw: RawComm = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: valid out and config pointers; the id is passed by value, as the C API takes it.
        let code = unsafe { (lib.comm_init_rank_config)(&mut raw, w, *id, r, &mut config) };
        if code != SUCCESS && code != IN_PROGRESS {
            let e = lib.error(OP, code);
            if !raw.is_null() {
                // SAFETY: a communicator RCCL returned; not used afterwards.
                unsafe { (lib.comm_abort)(raw) };
            }
            return Err(e);
        }
        if raw.is_null() {
            return Err(Error::Internal(format!("{OP} succeeded but returned no communicator")));
        }
        let mut comm = RcclComm { lib: lib.clone(), device: device.clone(), raw, world, timeout, aborted: false };
        comm.wait_ready(OP, deadline)?;
        Ok(comm)
    }

    /// Poll `ncclCommGetAsyncError` until RCCL leaves `ncclInProgress`; abort on an error or at
    /// `deadline`.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] at the deadline; [`Error::Nccl`] with RCCL's error.
    fn wait_ready(&mut self, op: &'static str, deadline: Instant) -> Result<()> {
        let mut polls = 0;
        loop {
            match self.async_state(op) {
                Ok(SUCCESS) => return Ok(()),
                Ok(IN_PROGRESS) => {}
                Ok(code) => return Err(self.fail(self.lib.error(op, code))),
                Err(e) => return Err(self.fail(e)),
            }
            if Instant::now() >= deadline {
                return Err(self.fail(Error::PeerTimeout { op, peer: None, waited: self.timeout }));
            }
            crate::exchange::backoff(&mut polls);
        }
    }

    /// The communicator's asynchronous state (`ncclCommGetAsyncError`): `ncclSuccess`,
    /// `ncclInProgress` or an error code.
    fn async_state(&self, op: &'static str) -> Result<c_int> {
        self.live(op)?;
        let mut state: c_int = SUCCESS;
        // SAFETY: a live communicator and a valid out pointer.
        self.lib.check(op, unsafe { (self.lib.comm_get_async_error)(self.raw, &mut state) })?;
        Ok(state)
    }

    /// Abort (if live) and return `e`.
    fn fail(&mut self, e: Error) -> Error {
        self.abort();
        e
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// `Ok` while the communicator was not aborted.
    fn live(&self, op: &str) -> Result<()> {
        if self.aborted {
            return Err(Error::usage(op, "the RCCL communicator was aborted; build a new one"));
        }
        Ok(())
    }

    /// Enqueue the sum of `count` elements of `dtype` over all ranks, from `send` into `recv`
    /// (`ncclAllReduce`), on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` are device memory of this communicator's device holding `count`
    /// elements of `dtype`, not written by other work until the call ran (equal for in place).
    ///
    /// # Collective
    /// Every rank, in the same order, with the same `count` and `dtype`.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] after [`RcclComm::abort`]; [`Error::PeerTimeout`] when RCCL is
    /// still enqueueing after the timeout (the communicator is aborted); [`Error::Nccl`].
    pub unsafe fn all_reduce(
        &mut self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        stream: &HipStream,
    ) -> Result<()> {
        self.live("RcclComm::all_reduce")?;
        // SAFETY: the caller's contract for the buffers; the communicator and stream are live.
        let code = unsafe {
            (self.lib.all_reduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                rccl_dtype(dtype),
                SUM,
                self.raw,
                stream.raw(),
            )
        };
        match code {
            // A non-blocking communicator may still be enqueueing (host work, bounded).
            SUCCESS | IN_PROGRESS => self.wait_ready("ncclAllReduce", Instant::now() + self.timeout),
            _ => Err(self.fail(self.lib.error("ncclAllReduce", code))),
        }
    }

    /// RCCL's asynchronous error of the communicator (`ncclCommGetAsyncError`): `Ok` while
    /// there is none (work still in progress is fine).
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] after [`RcclComm::abort`]; [`Error::Nccl`] with the error.
    pub fn async_error(&mut self) -> Result<()> {
        match self.async_state("ncclCommGetAsyncError")? {
            SUCCESS | IN_PROGRESS => Ok(()),
            code => Err(self.lib.error("ncclCommGetAsyncError (state)", code)),
        }
    }

    /// Abort the communicator (`ncclCommAbort`): outstanding work is cancelled and every later
    /// call fails. Nothing if it was aborted already.
    pub fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: a live communicator, not used for calls afterwards (`aborted`).
            let code = unsafe { (self.lib.comm_abort)(self.raw) };
            self.device.record_err(self.lib.check("ncclCommAbort", code));
        }
    }
}

impl Drop for RcclComm {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: a live communicator, not used afterwards; a failure is kept by the device.
            let code = unsafe { (self.lib.comm_destroy)(self.raw) };
            self.device.record_err(self.lib.check("ncclCommDestroy", code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::nccl::sys::{ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};
    use std::mem::offset_of;

    /// The 2.14 layout passed to RCCL is the head of every later `ncclConfig_t` (here the
    /// one of cudarc's NCCL headers), field for field, and the initializer is NCCL's.
    #[test]
    fn the_config_is_the_head_of_nccls_and_asks_for_non_blocking() {
        let ours = [
            offset_of!(RcclConfig, size),
            offset_of!(RcclConfig, magic),
            offset_of!(RcclConfig, version),
            offset_of!(RcclConfig, blocking),
            offset_of!(RcclConfig, cga_cluster_size),
            offset_of!(RcclConfig, min_ctas),
            offset_of!(RcclConfig, max_ctas),
            offset_of!(RcclConfig, net_name),
        ];
        let nccl = [
            offset_of!(ncclConfig_t, size),
            offset_of!(ncclConfig_t, magic),
            offset_of!(ncclConfig_t, version),
            offset_of!(ncclConfig_t, blocking),
            offset_of!(ncclConfig_t, cgaClusterSize),
            offset_of!(ncclConfig_t, minCTAs),
            offset_of!(ncclConfig_t, maxCTAs),
            offset_of!(ncclConfig_t, netName),
        ];
        assert_eq!(ours, nccl);
        assert!(size_of::<RcclConfig>() <= size_of::<ncclConfig_t>());
        let c = nonblocking_config();
        assert_eq!((c.size, c.magic, c.version, c.blocking), (size_of::<RcclConfig>(), 0xcafe_beef, 21400, 0));
        assert_eq!([c.cga_cluster_size, c.min_ctas, c.max_ctas], [i32::MIN; 3]);
        assert!(c.net_name.is_null());
        assert_eq!(IN_PROGRESS, ncclResult_t::ncclInProgress as c_int);
    }

    #[test]
    fn a_missing_library_is_unsupported_naming_it() {
        match Rccl::load_from(&["librccl-tpcomm-test-absent.so.1"]) {
            Err(Error::Unsupported { what, reason }) => {
                assert!(what.contains("RCCL"), "{what}");
                assert!(reason.contains("librccl-tpcomm-test-absent.so.1"), "{reason}");
                assert!(reason.contains("install RCCL"), "{reason}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("loaded a library that does not exist"),
        }
    }

    /// A library that loads but is not RCCL (the C library): Unsupported, naming the first
    /// entry point it lacks.
    #[test]
    fn a_library_without_the_entry_points_is_unsupported_naming_one() {
        match Rccl::load_from(&["librccl-tpcomm-test-absent.so", "libc.so.6"]) {
            Err(Error::Unsupported { reason, .. }) => {
                assert!(reason.contains("libc.so.6 was loaded but lacks ncclGetUniqueId"), "{reason}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("the C library taken for RCCL"),
        }
    }

    /// On this machine: RCCL loads with every entry point, or the default names are
    /// Unsupported naming both.
    #[test]
    fn the_default_names_load_rccl_or_say_what_to_install() {
        match Rccl::load() {
            Ok(lib) => assert!(LIBRARY_NAMES.contains(&lib.library())),
            Err(Error::Unsupported { reason, .. }) => {
                assert!(LIBRARY_NAMES.iter().all(|n| reason.contains(n)), "{reason}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// RCCL keeps NCCL's ABI: the values used here are those of cudarc's NCCL bindings.
    #[test]
    fn enum_values_are_nccls() {
        for (dtype, nccl) in [
            (DType::F16, ncclDataType_t::ncclFloat16),
            (DType::F32, ncclDataType_t::ncclFloat32),
            (DType::F64, ncclDataType_t::ncclFloat64),
            (DType::BF16, ncclDataType_t::ncclBfloat16),
        ] {
            assert_eq!(rccl_dtype(dtype), nccl as c_int, "{dtype:?}");
        }
        assert_eq!(SUM, ncclRedOp_t::ncclSum as c_int);
        for code in [
            ncclResult_t::ncclSuccess,
            ncclResult_t::ncclUnhandledCudaError,
            ncclResult_t::ncclSystemError,
            ncclResult_t::ncclInternalError,
            ncclResult_t::ncclInvalidArgument,
            ncclResult_t::ncclInvalidUsage,
            ncclResult_t::ncclRemoteError,
            ncclResult_t::ncclInProgress,
        ] {
            assert_eq!(result_name(code as c_int), format!("{code:?}"));
        }
        assert_eq!(result_name(-3), "ncclResult -3");
        assert_eq!(result_name(8), "ncclResult 8");
    }

    #[test]
    fn unique_ids_round_trip_as_bytes_of_the_c_size() {
        assert_eq!(size_of::<RcclUniqueId>(), size_of::<cudarc::nccl::sys::ncclUniqueId>());
        let bytes: Vec<u8> = (0..UNIQUE_ID_BYTES).map(|i| (i * 13 + 5) as u8).collect();
        assert_eq!(RcclUniqueId::from_bytes(&bytes).unwrap().to_bytes().as_slice(), bytes.as_slice());
        assert!(matches!(RcclUniqueId::from_bytes(&bytes[1..]), Err(Error::Internal(_))));
    }

    #[test]
    fn ranks_must_lie_in_the_world() {
        assert_eq!(check_ranks(0, 1).unwrap(), (0, 1));
        assert_eq!(check_ranks(7, 8).unwrap(), (7, 8));
        for (rank, world) in [(1, 1), (0, 0), (0, usize::MAX)] {
            assert!(matches!(check_ranks(rank, world), Err(Error::InvalidArgument { .. })), "rank {rank} of {world}");
        }
    }
}
