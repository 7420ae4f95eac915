//! The CUDA side of the runtime facade (the default build): cudarc's safe types under the
//! facade's names, the raw driver calls cudarc does not wrap behind small owning types
//! ([`ipc::IpcBuffer`], [`ipc::PeerMappings`], [`HostWord`], [`MappedHostPage`]), the launch
//! with programmatic dependent launch, and the NVRTC module cache ([`module_cache`]).
//!
//! `runtime/mod.rs` re-exports these items in a build without the `rocm` feature;
//! `runtime/hip/` offers the same names for ROCm. [`device`] opens the GPU and answers the
//! topology's questions; [`buffer`] is the memory behind a `DeviceBuffer` and its cudarc views.

pub(crate) mod buffer;
pub(crate) mod device;
pub(crate) mod ipc;
pub(crate) mod module_cache;

use crate::error::{Error, Result};
use crate::runtime::kernels::Family;
use cudarc::driver::{sys, CudaStream, DriverError};
use std::sync::Arc;

pub(crate) use buffer::DeviceMemory;
pub use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice};
pub(crate) use device::{
    bind, device_count, device_name, identity, native_atomics, open, ordinal, p2p_access, pci_bus_id,
};

/// The GPU a communicator runs on: cudarc's context (`tpcomm::Context` in the default build).
pub type Context = cudarc::driver::CudaContext;
/// A stream of the GPU (`tpcomm::Stream` in the default build).
pub type Stream = CudaStream;
/// A captured, instantiated graph (`tpcomm::Graph` in the default build; what
/// `RegisteredGraph::graph` returns).
pub type Graph = cudarc::driver::CudaGraph;
/// A kernel of a loaded module.
pub type Function = cudarc::driver::CudaFunction;
/// A loaded kernel family.
pub type Module = Arc<cudarc::driver::CudaModule>;

/// Lanes of a warp.
pub const WAVE: usize = 32;

/// Wait for all work of `ctx`'s GPU (`cuCtxSynchronize`); `op` names the step in the error.
///
/// # Errors
/// [`Error::Cuda`] naming `op` when work on the device failed.
pub(crate) fn synchronize(ctx: &Context, op: &'static str) -> Result<()> {
    ctx.synchronize().map_err(cuda(op))
}

/// A number that tells streams apart (the raw handle's address).
pub(crate) fn stream_id(stream: &Stream) -> usize {
    stream.cu_stream() as usize
}

/// Whether `stream` is capturing a graph now.
///
/// # Errors
/// [`Error::Cuda`] when the driver cannot tell.
pub(crate) fn is_capturing(stream: &Stream) -> Result<bool> {
    Ok(stream.capture_status().map_err(cuda("cuStreamIsCapturing"))?
        == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
}

/// Enqueue a copy of `bytes` from `src` to `dst` on `stream` (`cuMemcpyDtoDAsync`).
///
/// # Safety
/// Both ranges are device memory of the stream's context for `bytes` bytes, not written by
/// other work until the copy ran.
pub(crate) unsafe fn copy_async(stream: &Stream, dst: u64, src: u64, bytes: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(cuda("cuMemcpyDtoDAsync"))
}

/// Enqueue zero-filling `bytes` at `dst` on `stream` (`cuMemsetD8Async`).
///
/// # Safety
/// As [`copy_async`] for the destination.
pub(crate) unsafe fn zero_async(stream: &Stream, dst: u64, bytes: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }
        .map_err(cuda("cuMemsetD8Async"))
}

/// Start capturing `stream` into a graph, in relaxed mode.
///
/// # Errors
/// [`Error::Cuda`], for example when the stream captures already.
pub(crate) fn begin_capture(stream: &Stream) -> Result<()> {
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).map_err(cuda("cuStreamBeginCapture"))
}

/// End the capture of `stream` and instantiate what was recorded (`None`: nothing was).
///
/// # Errors
/// [`Error::Cuda`] when the capture failed or cannot be instantiated.
pub(crate) fn end_capture(stream: &Arc<Stream>) -> Result<Option<Graph>> {
    stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(cuda("cuStreamEndCapture / cuGraphInstantiate"))
}

/// Replay `graph` on the stream it was captured on (`cuGraphLaunch`).
///
/// # Errors
/// [`Error::Cuda`] when the launch fails.
pub(crate) fn launch_graph(graph: &Graph) -> Result<()> {
    graph.launch().map_err(cuda("cuGraphLaunch"))
}

/// Compile (or read from the disk cache in `cache_dir`) `family` for `world` ranks for the
/// GPU's exact architecture and load it; returns the module and whether the CUBIN came from
/// the disk cache. `what` names the backend in errors.
///
/// # Errors
/// [`Error::Unsupported`] for a GPU older than [`MIN_ARCH`]; [`Error::Compile`],
/// [`Error::Cuda`].
pub(crate) fn load_module(
    ctx: &Arc<Context>,
    family: &Family,
    world: usize,
    cache_dir: Option<std::path::PathBuf>,
    what: &str,
) -> Result<(Module, bool)> {
    check_arch(ctx, what)?;
    let cache = module_cache::ModuleCache::new(ctx, cache_dir)?;
    let module = cache.module(family.name, family.source, &(family.defines)(world))?;
    Ok((module, cache.disk_hits() > 0))
}

/// The kernel `name` of `module`.
///
/// # Errors
/// [`Error::Cuda`] when the module has no such entry point.
pub(crate) fn function(module: &Module, name: &str) -> Result<Function> {
    module.load_function(name).map_err(cuda("cuModuleGetFunction"))
}

/// The oldest GPU architecture the kernels compile for: they use `cvt.rn.bf16.f32` and
/// system-scope acquire/release, which need sm_80. Older GPUs get no IPC kernels (NCCL serves
/// them) instead of a compile error.
pub(crate) const MIN_ARCH: (i32, i32) = (8, 0);

/// The IPC kernels need sm_80 or newer (bf16 conversions and system-scope acquire/release).
///
/// # Errors
/// [`Error::Unsupported`] naming the GPU's architecture on older GPUs, before anything is
/// compiled, so the dispatch sends their calls to NCCL.
fn check_arch(ctx: &Context, what: &str) -> Result<()> {
    let cc = ctx.compute_capability().map_err(cuda("cuDeviceGetAttribute(compute capability)"))?;
    if cc < MIN_ARCH {
        return Err(Error::Unsupported {
            what: what.into(),
            reason: format!(
                "the GPU is sm_{}{} and the IPC kernels need sm_{}{} or newer",
                cc.0, cc.1, MIN_ARCH.0, MIN_ARCH.1
            ),
        });
    }
    Ok(())
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
pub(crate) fn stream_done(stream: &Stream, op: &'static str) -> Result<bool> {
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
    func: &Function,
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
pub(crate) fn co_resident_blocks<'a>(
    ctx: &Context,
    funcs: impl Iterator<Item = &'a Function>,
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
    super::resident_cap(per_sm as usize, sms, threads, ranks_per_device, what)
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
    ctx: Arc<Context>,
}

impl MappedHostPage {
    /// Register `bytes` at `host` (page aligned) in `ctx`.
    ///
    /// # Safety
    /// `host` must stay mapped for `bytes` bytes until the returned value is dropped.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the driver refuses the registration.
    pub(crate) unsafe fn register(ctx: &Arc<Context>, host: *mut u8, bytes: usize) -> Result<Self> {
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
