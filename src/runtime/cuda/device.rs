//! Opening the GPU, and what the topology asks the CUDA driver about it: device count and
//! names, PCI bus ids, UUIDs, peer access and native atomics between GPUs (`runtime/hip/device.rs`
//! answers the same questions on ROCm).

use super::{cuda, driver_present, Context};
use crate::error::{Error, Result};
use cudarc::driver::{result, sys};
use std::sync::Arc;

/// Number of CUDA devices visible to this process, or 0 where no CUDA driver can be loaded.
pub(crate) fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    Context::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Name of a CUDA device (`NVIDIA H100 80GB HBM3`), if a driver and the device are there.
pub(crate) fn device_name(ordinal: usize) -> Option<String> {
    if device_count() <= ordinal {
        return None;
    }
    let dev = result::device::get(ordinal as i32).ok()?;
    result::device::get_name(dev).ok()
}

/// PCI bus id of a CUDA device (`0000:3b:00.0`), lower case, if the driver reports one.
pub(crate) fn pci_bus_id(ordinal: usize) -> Option<String> {
    if !driver_present() {
        return None;
    }
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: the buffer is writable for its whole length and the driver NUL-terminates.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev) }.result().ok()?;
    // SAFETY: NUL-terminated by the driver on success.
    let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(id.to_string_lossy().to_lowercase())
}

/// The context of GPU `ordinal` (the primary context), or of GPU `local_rank % visible GPUs`
/// when `ordinal` is `None`, made current on this thread.
///
/// # Errors
/// [`Error::Unsupported`] without a CUDA driver or where the driver finds no GPU;
/// [`Error::Cuda`] for other driver errors.
pub(crate) fn open(ordinal: Option<usize>, local_rank: usize) -> Result<Arc<Context>> {
    if !driver_present() {
        return Err(Error::Unsupported {
            what: "allreduce of device memory".into(),
            reason: "no CUDA driver library (libcuda) can be loaded on this machine".into(),
        });
    }
    // A driver without a usable GPU is "not supported here", like a missing driver; other
    // driver errors stay CUDA errors.
    let context_error = |e: cudarc::driver::DriverError| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::Unsupported {
            what: "allreduce of device memory".into(),
            reason: "the CUDA driver finds no GPU (CUDA_ERROR_NO_DEVICE): check CUDA_VISIBLE_DEVICES and the \
                     NVIDIA driver, or reduce host memory"
                .into(),
        },
        _ => cuda("cuCtxCreate / primary context")(e),
    };
    let ordinal = ordinal.unwrap_or_else(|| match device_count() {
        0 => local_rank,
        n => local_rank % n,
    });
    let ctx = Context::new(ordinal).map_err(context_error)?;
    bind(&ctx)?;
    Ok(ctx)
}

/// Make `ctx` current on the calling thread.
///
/// # Errors
/// [`Error::Cuda`] when the driver refuses.
pub(crate) fn bind(ctx: &Context) -> Result<()> {
    ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))
}

/// The device ordinal of `ctx`.
pub(crate) fn ordinal(ctx: &Context) -> usize {
    ctx.ordinal()
}

/// Identity of `ctx`'s device: its UUID (zeros where the driver reports none) and its PCI bus
/// id (empty where unknown).
pub(crate) fn identity(ctx: &Context) -> ([u8; 16], String) {
    let uuid = ctx.uuid().map(|u| u.bytes.map(|b| b as u8)).unwrap_or([0; 16]);
    let bus = pci_bus_id(ctx.ordinal()).unwrap_or_default();
    (uuid, bus)
}

/// Whether the link from `ctx`'s device to `peer_bus` supports native atomics (NVLink does,
/// PCIe peer access does not); false when the driver cannot tell.
pub(crate) fn native_atomics(ctx: &Context, peer_bus: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(peer_bus) else { return false };
    let mut peer: sys::CUdevice = 0;
    let mut value = 0;
    // SAFETY: valid out pointers, NUL-terminated id, device handles from the driver.
    unsafe {
        sys::cuDeviceGetByPCIBusId(&mut peer, c.as_ptr()).result().is_ok()
            && sys::cuDeviceGetP2PAttribute(
                &mut value,
                sys::CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED,
                ctx.cu_device(),
                peer,
            )
            .result()
            .is_ok()
            && value != 0
    }
}

/// Whether `ctx`'s device can access the device with PCI bus id `peer_bus` directly.
///
/// # Errors
/// Why it cannot be told (the peer is not visible here, or the driver refuses).
pub(crate) fn p2p_access(ctx: &Context, peer_bus: &str) -> std::result::Result<bool, String> {
    let c = std::ffi::CString::new(peer_bus).map_err(|e| e.to_string())?;
    let mut peer: sys::CUdevice = 0;
    // SAFETY: valid out pointer and NUL-terminated id.
    unsafe { sys::cuDeviceGetByPCIBusId(&mut peer, c.as_ptr()) }.result().map_err(|e| {
        format!(
            "GPU {peer_bus}, used by another rank, is not visible to this process ({e:?}); when \
             CUDA_VISIBLE_DEVICES gives each rank only its own GPU, tpcomm cannot check peer access between \
             GPUs, so the IPC kernels stay off and NCCL serves the calls: make every GPU of the node visible \
             to every rank and pick each rank's GPU with Communicator::builder(..).device(ordinal)"
        )
    })?;
    let mut can = 0;
    // SAFETY: valid out pointer and device handles.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, ctx.cu_device(), peer) }.result().map_err(|e| format!("{e:?}"))?;
    Ok(can != 0)
}
