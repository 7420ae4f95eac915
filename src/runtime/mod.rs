//! The vendor runtime the backends share: streams, IPC buffers, the NVRTC module cache, mapped
//! host words, protocol constants and the embedded kernel sources.
//!
//! Raw driver calls that cudarc does not wrap live here behind small owning types
//! ([`ipc::IpcBuffer`], [`ipc::PeerMappings`], [`HostWord`], [`MappedHostPage`]). Backends and the
//! device layer reach the GPU only through this module and cudarc's safe types, so a HIP runtime
//! can sit beside it with the same names (topology's device queries are the one other place that
//! asks the driver).

#[cfg(feature = "rocm")]
pub(crate) mod hip;
pub(crate) mod ipc;
pub(crate) mod kernels;
pub(crate) mod module_cache;
pub(crate) mod protocol;

use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaStream, DriverError};

/// The stream a call is enqueued on: a CUDA stream, or the host itself for the CPU stand-in of
/// the GPU backends (tests), where "enqueued" means "done".
#[derive(Clone, Copy)]
pub(crate) enum StreamRef<'a> {
    /// A CUDA stream of the communicator's context.
    Cuda(&'a CudaStream),
    /// No GPU: the work runs on the calling thread.
    Host,
}

impl<'a> StreamRef<'a> {
    /// The CUDA stream.
    ///
    /// # Errors
    /// [`Error::Internal`] for the host stand-in (a GPU backend got a host call).
    pub(crate) fn cuda(self) -> Result<&'a CudaStream> {
        match self {
            StreamRef::Cuda(s) => Ok(s),
            StreamRef::Host => Err(Error::Internal("a GPU backend was handed a host-only call".into())),
        }
    }

    /// Whether the stream is capturing a CUDA graph now (work enqueued is recorded, not run).
    ///
    /// # Errors
    /// [`Error::Cuda`] when the driver cannot tell.
    pub(crate) fn is_capturing(self) -> Result<bool> {
        match self {
            StreamRef::Cuda(s) => Ok(s.capture_status().map_err(cuda("cuStreamIsCapturing"))?
                == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE),
            StreamRef::Host => Ok(false),
        }
    }

    /// Enqueue a copy of `bytes` from `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges are valid memory of this stream's kind for `bytes` bytes (device memory of the
    /// stream's context, or host memory for [`StreamRef::Host`]), not written by other work
    /// until the copy ran.
    pub(crate) unsafe fn copy(self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 || dst == src {
            return Ok(());
        }
        match self {
            // SAFETY: the caller's contract.
            StreamRef::Cuda(s) => unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, s.cu_stream()) }
                .map_err(cuda("cuMemcpyDtoDAsync")),
            StreamRef::Host => {
                // SAFETY: the caller's contract; the ranges may overlap only if equal (checked).
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// Enqueue zero-filling `bytes` at `dst`.
    ///
    /// # Safety
    /// As [`StreamRef::copy`] for the destination.
    pub(crate) unsafe fn zero(self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match self {
            // SAFETY: the caller's contract.
            StreamRef::Cuda(s) => unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, s.cu_stream()) }
                .map_err(cuda("cuMemsetD8Async")),
            StreamRef::Host => {
                // SAFETY: the caller's contract.
                unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
                Ok(())
            }
        }
    }
}

/// True when a CUDA driver library can be loaded in this process.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library; makes no driver call.
    unsafe { sys::is_culib_present() }
}

/// Whether all work enqueued on `stream` so far has finished (`cuStreamQuery`), without
/// waiting: for bounded waits that poll other conditions between queries.
///
/// # Errors
/// [`Error::Cuda`] naming `op` when the stream holds a failed operation.
pub fn stream_done(stream: &cudarc::driver::CudaStream, op: &'static str) -> Result<bool> {
    // SAFETY: the stream handle is live for the borrow of `stream`.
    match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => check(op, other).map(|()| false),
    }
}

/// Turn a raw driver result into [`Error::Cuda`] naming `op`.
pub(crate) fn check(op: &'static str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|source| Error::Cuda { op, source })
}

/// Wrap a cudarc driver error with the operation that failed.
pub(crate) fn cuda(op: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |source| Error::Cuda { op, source }
}

/// A kernel argument for [`launch`]: the address of its value.
pub(crate) fn arg<T>(value: &T) -> *mut std::ffi::c_void {
    value as *const T as *mut std::ffi::c_void
}

/// Launch `func` on `stream` with `grid` blocks of `block` threads (`cuLaunchKernelEx`). With
/// `pdl` the launch may overlap the previous kernel of the stream (programmatic dependent
/// launch): tpcomm's kernels wait for their predecessor before touching memory, so the calls
/// keep their order and only the launch latency is hidden; a collective kernel lets its own
/// successor be scheduled only once every peer's kernel of the call is resident
/// (kernels/common.cuh), so no grid has to be halved for it. Inside a capture the dependency
/// becomes a programmatic graph edge.
///
/// # Safety
/// `params` point to the kernel's arguments, in its order and of its types, all valid for the
/// whole run of the kernel's work.
///
/// # Errors
/// [`Error::Cuda`] naming `op` when the launch fails.
pub(crate) unsafe fn launch(
    func: &cudarc::driver::CudaFunction,
    grid: usize,
    block: usize,
    stream: &CudaStream,
    params: &mut [*mut std::ffi::c_void],
    pdl: bool,
    op: &'static str,
) -> Result<()> {
    stream.context().bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
    // SAFETY: an all-zero attribute is a valid value of this plain C union; id and value set next.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block as u32,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
        numAttrs: u32::from(pdl),
    };
    // SAFETY: the caller's contract for `params`; `cfg` and `attr` live across the call.
    check(op, unsafe { sys::cuLaunchKernelEx(&cfg, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) })
}

/// Most blocks one launch of any of `funcs` (at `threads` per block) may have so that the blocks
/// of all `ranks_per_device` ranks sharing the GPU are resident at once: a block spinning on a
/// peer's block that cannot be scheduled would deadlock.
///
/// # Errors
/// [`Error::Unsupported`] when the GPU cannot hold one block per rank; [`Error::Cuda`].
pub fn co_resident_blocks<'a>(
    ctx: &cudarc::driver::CudaContext,
    funcs: impl Iterator<Item = &'a cudarc::driver::CudaFunction>,
    threads: usize,
    ranks_per_device: usize,
    what: &str,
) -> Result<usize> {
    let mut per_sm = u32::MAX;
    for f in funcs {
        let occ = f
            .occupancy_max_active_blocks_per_multiprocessor(threads as u32, 0, None)
            .map_err(cuda("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        per_sm = per_sm.min(occ);
    }
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(cuda("cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)"))? as usize;
    let resident = per_sm as usize * sms;
    let share = ranks_per_device.max(1);
    let cap = resident / share;
    if cap == 0 {
        return Err(Error::Unsupported {
            what: format!("{what} with {share} ranks on one GPU"),
            reason: format!("the GPU holds {resident} resident blocks of {threads} threads, fewer than one per rank"),
        });
    }
    Ok(cap)
}

/// A wait limit as the kernels take it: nanoseconds, saturated far beyond any real wait.
pub(crate) fn timeout_ns(timeout: std::time::Duration) -> u64 {
    u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX / 2)
}

/// One 64-bit word of pinned host memory mapped into the device address space: kernels store
/// into it, the host reads it after synchronising, without a copy.
pub(crate) struct HostWord {
    host: *mut u64,
    device: sys::CUdeviceptr,
}

// SAFETY: the word is plain pinned memory; access goes through volatile reads and writes.
unsafe impl Send for HostWord {}
// SAFETY: as above; `&self` methods only read or write the word volatilely.
unsafe impl Sync for HostWord {}

impl HostWord {
    /// Allocate the word (zero) in the current context.
    ///
    /// # Errors
    /// [`Error::Cuda`] when pinned allocation or mapping fails.
    pub fn new() -> Result<Self> {
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: `host` is a valid out pointer; 8 bytes are requested.
        check("cuMemHostAlloc(error word)", unsafe { sys::cuMemHostAlloc(&mut host, 8, flags) })?;
        let host = host.cast::<u64>();
        // SAFETY: freshly allocated, 8 bytes, suitably aligned (page aligned).
        unsafe { host.write_volatile(0) };
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `host` came from cuMemHostAlloc with DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) };
        if let Err(e) = check("cuMemHostGetDevicePointer(error word)", r) {
            // SAFETY: allocated above and not used after.
            unsafe { sys::cuMemFreeHost(host.cast()) };
            return Err(e);
        }
        Ok(HostWord { host, device })
    }

    /// The address kernels write to.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.device
    }

    /// The current value (synchronise with the writing stream first).
    pub fn get(&self) -> u64 {
        // SAFETY: the pointer is valid for the life of `self`.
        unsafe { self.host.read_volatile() }
    }
}

impl Drop for HostWord {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in `new`; freed once. A failure cannot be
        // reported from Drop and leaks 8 bytes at worst.
        let _ = unsafe { sys::cuMemFreeHost(self.host.cast()) };
    }
}

/// Host memory (for example a page of a shared-memory segment) registered with the driver and
/// mapped into the device address space, so kernels read and write the very words the host and
/// other processes of the node see. Unregistered on drop.
pub(crate) struct MappedHostPage {
    host: *mut u8,
    device: sys::CUdeviceptr,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl MappedHostPage {
    /// Register `bytes` at `host` (page aligned) in `ctx`.
    ///
    /// # Safety
    /// `host` must stay mapped for `bytes` bytes until the returned value is dropped.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the driver refuses the registration.
    pub(crate) unsafe fn register(
        ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
        host: *mut u8,
        bytes: usize,
    ) -> Result<Self> {
        ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller keeps the range mapped; flags ask for a device mapping.
        check("cuMemHostRegister(fault page)", unsafe { sys::cuMemHostRegister_v2(host.cast(), bytes, flags) })?;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: registered just above with DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) };
        if let Err(e) = check("cuMemHostGetDevicePointer(fault page)", r) {
            // SAFETY: registered above, not used after.
            unsafe { sys::cuMemHostUnregister(host.cast()) };
            return Err(e);
        }
        Ok(MappedHostPage { host, device, ctx: ctx.clone() })
    }

    /// The device address of the first byte.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.device
    }
}

impl Drop for MappedHostPage {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: registered in `register`, unregistered once; a failure is kept by the context.
        self.ctx.record_err(unsafe { sys::cuMemHostUnregister(self.host.cast()) }.result());
    }
}
