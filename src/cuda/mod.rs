//! CUDA plumbing the backends share: IPC buffers, the NVRTC module cache, protocol constants.
//!
//! Raw driver calls that cudarc does not wrap live here behind small owning types
//! ([`ipc::IpcBuffer`], [`ipc::PeerMappings`], [`HostWord`]); nothing outside this module calls
//! `cudarc::driver::sys` for them.

pub mod ipc;
pub mod module_cache;
pub mod protocol;

use crate::error::{Error, Result};
use cudarc::driver::{sys, DriverError};

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

/// Whether `stream` is capturing a CUDA graph now (work enqueued is recorded, not run).
///
/// # Errors
/// [`Error::Cuda`] when the driver cannot tell.
pub(crate) fn is_capturing(stream: &cudarc::driver::CudaStream) -> Result<bool> {
    Ok(stream.capture_status().map_err(cuda("cuStreamIsCapturing"))?
        == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
}

/// A wait limit as the kernels take it: nanoseconds, saturated far beyond any real wait.
pub(crate) fn timeout_ns(timeout: std::time::Duration) -> u64 {
    u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX / 2)
}

/// The checks every IPC kernel family makes before a launch: `entry` (the kernel for `dtype`,
/// `None` where the family has none) exists and both pointers are 16-byte aligned.
///
/// # Errors
/// [`Error::Unsupported`] naming `family` for a dtype without kernel; [`Error::InvalidArgument`]
/// for misaligned pointers, saying how to fix them.
pub(crate) fn check_launch(
    op: &'static str,
    family: &str,
    entry: Option<&'static str>,
    dtype: crate::dtype::DType,
    input: u64,
    output: u64,
) -> Result<&'static str> {
    let Some(name) = entry else {
        return Err(Error::Unsupported {
            what: format!("{family} of {dtype}"),
            reason: "the kernels reduce float, half and bfloat16".into(),
        });
    };
    if input % protocol::ALIGN as u64 != 0 || output % protocol::ALIGN as u64 != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "input {input:#x} and output {output:#x} must be {}-byte aligned (offset a view by a multiple of {} \
                 elements)",
                protocol::ALIGN,
                protocol::ALIGN / dtype.size()
            ),
        ));
    }
    Ok(name)
}

/// One 64-bit word of pinned host memory mapped into the device address space: kernels store
/// into it, the host reads it after synchronising, without a copy.
pub struct HostWord {
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

    /// Overwrite the value (no kernel may be writing it concurrently).
    pub fn set(&self, v: u64) {
        // SAFETY: the pointer is valid for the life of `self`.
        unsafe { self.host.write_volatile(v) }
    }
}

impl Drop for HostWord {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in `new`; freed once. A failure cannot be
        // reported from Drop and leaks 8 bytes at worst.
        let _ = unsafe { sys::cuMemFreeHost(self.host.cast()) };
    }
}

/// Kernel sources compiled at run time, embedded in the library so binaries need no files. Each
/// family is `kernels/common.cuh` followed by the family's own file.
pub mod kernels {
    /// `kernels/custom_allreduce.cu`: one-shot and two-shot for f32, f16 and bf16.
    pub const CUSTOM_ALLREDUCE: &str =
        concat!(include_str!("../../kernels/common.cuh"), include_str!("../../kernels/custom_allreduce.cu"));
    /// Family name of [`CUSTOM_ALLREDUCE`] (cache file names, error messages).
    pub const CUSTOM_ALLREDUCE_NAME: &str = "custom_allreduce";
    /// Entry points of [`CUSTOM_ALLREDUCE`], each `{algorithm}_{dtype}`.
    pub const CUSTOM_ALLREDUCE_ENTRIES: [&str; 6] =
        ["oneshot_f32", "oneshot_f16", "oneshot_bf16", "twoshot_f32", "twoshot_f16", "twoshot_bf16"];
    /// `kernels/packet_allreduce.cu`: LL packets (all-pairs and two-phase) and Lamport push.
    pub const PACKET_ALLREDUCE: &str =
        concat!(include_str!("../../kernels/common.cuh"), include_str!("../../kernels/packet_allreduce.cu"));
    /// Family name of [`PACKET_ALLREDUCE`].
    pub const PACKET_ALLREDUCE_NAME: &str = "packet_allreduce";
    /// Entry points of [`PACKET_ALLREDUCE`], each `{algorithm}_{dtype}`.
    pub const PACKET_ALLREDUCE_ENTRIES: [&str; 9] = [
        "packet_f32",
        "packet_f16",
        "packet_bf16",
        "packet2_f32",
        "packet2_f16",
        "packet2_bf16",
        "lamport_f32",
        "lamport_f16",
        "lamport_bf16",
    ];
}
