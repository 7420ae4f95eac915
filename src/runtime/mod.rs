//! The vendor runtime the backends share, behind one facade: one vendor per build.
//!
//! Two runtimes sit side by side with the same names: [`cuda`] (cudarc, NVRTC, the raw driver
//! calls cudarc does not wrap) in the default build, and [`hip`] (the HIP runtime of ROCm
//! through `hip-runtime-sys`) in a build with the Cargo feature `rocm`. This module re-exports
//! exactly one of them under neutral names ([`Context`], [`Stream`], [`Function`], [`Graph`],
//! [`HostWord`], [`MappedHostPage`], [`launch`], [`co_resident_blocks`], ...), and
//! [`ipc`] does the same for the IPC types, so the backends and the device layer are written
//! once and never name a vendor. What is vendor-neutral lives here: [`StreamRef`] (a device
//! stream, or the host for the CPU stand-in), kernel arguments ([`arg`]), wait limits
//! ([`timeout_ns`]), the protocol constants ([`protocol`]) and the kernel families
//! ([`kernels`]), whose loading the vendor does (NVRTC on CUDA, the embedded code objects on
//! HIP).
//!
//! The vendor modules offer the same items with the same signatures (a build with the other
//! vendor never compiles them, so nothing checks that but the build of each feature set, which
//! `mpirun-scripts/test.sh` runs): the types above; `open`, `bind`, `synchronize`;
//! `stream_id`, `stream_done`, `is_capturing`, `copy_async`, `zero_async`; `begin_capture`,
//! `end_capture`, `launch_graph`; `load_module`, `function`; the device queries topology asks
//! (`device_count`, `device_name`, `pci_bus_id`, `ordinal`, `identity`, `p2p_access`,
//! `native_atomics`); `WAVE`, the lanes of a warp or wavefront; and the public device-pointer
//! traits and the memory behind a `DeviceBuffer`.

#[cfg(not(feature = "rocm"))]
pub(crate) mod cuda;
#[cfg(feature = "rocm")]
pub(crate) mod hip;
pub(crate) mod ipc;
pub(crate) mod kernels;
pub(crate) mod protocol;

#[cfg(not(feature = "rocm"))]
use cuda as vendor;
#[cfg(feature = "rocm")]
use hip as vendor;

use crate::error::{Error, Result};

pub(crate) use vendor::{
    begin_capture, bind, co_resident_blocks, device_count, device_name, end_capture, function, identity, is_capturing,
    launch, launch_graph, load_module, native_atomics, open, ordinal, p2p_access, pci_bus_id, stream_done, stream_id,
    synchronize, DeviceMemory, Function, HostWord, MappedHostPage, WAVE,
};
pub use vendor::{Context, DevicePtr, DevicePtrMut, DeviceSlice, Graph, Stream};

/// The stream a call is enqueued on: a device stream of this build's vendor, or the host itself
/// for the CPU stand-in of the GPU backends (tests), where "enqueued" means "done".
#[derive(Clone, Copy)]
pub(crate) enum StreamRef<'a> {
    /// A stream of the communicator's GPU.
    Device(&'a Stream),
    /// No GPU: the work runs on the calling thread.
    Host,
}

impl<'a> StreamRef<'a> {
    /// The device stream.
    ///
    /// # Errors
    /// [`Error::Internal`] for the host stand-in (a GPU backend got a host call).
    pub(crate) fn device(self) -> Result<&'a Stream> {
        match self {
            StreamRef::Device(s) => Ok(s),
            StreamRef::Host => Err(Error::Internal("a GPU backend was handed a host-only call".into())),
        }
    }

    /// Whether the stream is capturing a graph now (work enqueued is recorded, not run).
    ///
    /// # Errors
    /// The vendor's error when the runtime cannot tell.
    pub(crate) fn is_capturing(self) -> Result<bool> {
        match self {
            StreamRef::Device(s) => is_capturing(s),
            StreamRef::Host => Ok(false),
        }
    }

    /// Enqueue a copy of `bytes` from `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges are valid memory of this stream's kind for `bytes` bytes (device memory of the
    /// stream's GPU, or host memory for [`StreamRef::Host`]), not written by other work
    /// until the copy ran.
    pub(crate) unsafe fn copy(self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 || dst == src {
            return Ok(());
        }
        match self {
            // SAFETY: the caller's contract.
            StreamRef::Device(s) => unsafe { vendor::copy_async(s, dst, src, bytes) },
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
            StreamRef::Device(s) => unsafe { vendor::zero_async(s, dst, bytes) },
            StreamRef::Host => {
                // SAFETY: the caller's contract.
                unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
                Ok(())
            }
        }
    }
}

/// A kernel argument for [`launch`]: the address of its value.
pub(crate) fn arg<T>(value: &T) -> *mut std::ffi::c_void {
    value as *const T as *mut std::ffi::c_void
}

/// A wait limit as the kernels take it: nanoseconds, saturated far beyond any real wait.
pub(crate) fn timeout_ns(timeout: std::time::Duration) -> u64 {
    u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX / 2)
}

/// Most blocks per launch so that the blocks of all `ranks_per_device` ranks sharing a GPU are
/// resident at once (a block spinning on a peer's block that cannot be scheduled would
/// deadlock): `per_sm` blocks of `threads` threads per multiprocessor (compute unit) times
/// `sms`, shared by the ranks. The vendors' `co_resident_blocks` ask their runtime for the two
/// counts. `what` names the backend in the error.
///
/// # Errors
/// [`Error::Unsupported`] when the GPU cannot hold one block per rank.
pub(crate) fn resident_cap(
    per_sm: usize,
    sms: usize,
    threads: usize,
    ranks_per_device: usize,
    what: &str,
) -> Result<usize> {
    let resident = per_sm.saturating_mul(sms);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_blocks_are_per_cu_times_cus_shared_by_the_ranks() {
        assert_eq!(resident_cap(2, 304, 512, 1, "custom").unwrap(), 608);
        assert_eq!(resident_cap(2, 304, 512, 8, "custom").unwrap(), 76);
        assert_eq!(resident_cap(usize::MAX, 2, 512, 0, "custom").unwrap(), usize::MAX);
        match resident_cap(1, 4, 1024, 5, "packet allreduce") {
            Err(Error::Unsupported { what, reason }) => {
                assert_eq!(what, "packet allreduce with 5 ranks on one GPU");
                assert!(reason.contains("4 resident blocks of 1024 threads"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
