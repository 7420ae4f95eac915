//! HIP IPC: device memory other processes can map, and the mappings of theirs we opened; the
//! HIP counterpart of `src/runtime/cuda/ipc.rs`, with the same names (re-exported by
//! `runtime::ipc` in a ROCm build).
//!
//! A HIP IPC handle (`hipIpcMemHandle_t`) is 64 opaque bytes, as CUDA's is, so both travel as
//! the crate's [`IpcHandle`] and the exchange over MPI is the same for both vendors. As on CUDA,
//! a handle names a whole allocation ([`export`] sends the allocation's base plus the offset)
//! and a process opens each handle once, so [`PeerMappings`] caches what it opened and closes
//! everything on drop. [`IpcBuffer`] sizes are rounded up to [`IPC_GRANULARITY`] as on CUDA,
//! so that no two exported allocations share a page (seen on CUDA; not checked on AMD).
//!
//! What peers poll lives in uncached device memory ([`IpcBuffer::alloc_signal`],
//! [`Memory::Uncached`], `hipExtMallocWithFlags(.., hipDeviceMallocUncached)`), so that loads see
//! peers' stores: the barrier flags of the signal areas, as in SGLang's ROCm custom allreduce,
//! and, by the same reasoning, the packet buffers (LL flags beside the data, Lamport sentinels)
//! and the quick inboxes (QuickReduce allocates its whole buffer uncached). Data peers only read
//! after a barrier (scratch, staging) is ordinary `hipMalloc` memory ([`IpcBuffer::alloc`]).
//! Whether HIP 5.2 accepts the uncached flag, and whether these choices are right and fast on
//! MI200 / MI300, is not verified.

use super::check;
use super::device::HipDevice;
use crate::error::{Error, Result};
pub use crate::runtime::ipc::{IpcHandle, IPC_GRANULARITY, IPC_HANDLE_BYTES};
use hip_runtime_sys::{
    hipDeviceptr_t, hipExtMallocWithFlags, hipFree, hipIpcCloseMemHandle, hipIpcGetMemHandle, hipIpcMemHandle_t,
    hipIpcMemLazyEnablePeerAccess, hipIpcOpenMemHandle, hipMalloc, hipMemGetAddressRange, hipMemcpy, hipMemcpyKind,
    hipMemset, hipStreamSynchronize,
};
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// `hipDeviceMallocUncached` from HIP 6's `hip_runtime_api.h`: device memory that bypasses the
/// caches, for flags peers poll. The HIP 5.x headers the bindings come from lack it (they stop
/// at `hipMallocSignalMemory` = 2).
const HIP_DEVICE_MALLOC_UNCACHED: u32 = 3;

// A HIP handle must fit the crate's handle type, byte for byte.
const _: () = assert!(size_of::<hipIpcMemHandle_t>() == IPC_HANDLE_BYTES);

/// HIP's handle as the crate's bytes.
fn handle_from_raw(raw: &hipIpcMemHandle_t) -> IpcHandle {
    IpcHandle(raw.reserved.map(|c| c as u8))
}

/// The crate's bytes as HIP's handle.
fn handle_to_raw(handle: &IpcHandle) -> hipIpcMemHandle_t {
    hipIpcMemHandle_t { reserved: handle.0.map(|b| b as c_char) }
}

/// Check that `bytes` at `offset` lie inside a buffer of `len` bytes.
///
/// # Errors
/// [`Error::Internal`] naming `op` when they do not (or their end overflows).
pub fn check_range(op: &str, offset: usize, bytes: usize, len: usize) -> Result<()> {
    match offset.checked_add(bytes) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Error::Internal(format!("{op}: {bytes} bytes at {offset} exceed the buffer's {len}"))),
    }
}

/// Bytes an [`IpcBuffer`] of `bytes` allocates: whole granules, at least one.
fn rounded(bytes: usize) -> usize {
    bytes.max(1).div_ceil(IPC_GRANULARITY) * IPC_GRANULARITY
}

/// The allocation `ptr` lies in: `(base, size)` (`hipMemGetAddressRange`).
///
/// # Errors
/// [`Error::Hip`] when `ptr` is not device memory of `device`.
pub fn allocation_range(device: &HipDevice, ptr: u64) -> Result<(u64, usize)> {
    device.bind()?;
    let mut base: hipDeviceptr_t = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: valid out pointers; HIP checks the address.
    check("hipMemGetAddressRange", unsafe { hipMemGetAddressRange(&mut base, &mut size, ptr as hipDeviceptr_t) })?;
    Ok((base as u64, size))
}

/// The IPC handle of the allocation holding `ptr`, and `ptr`'s offset from its base.
///
/// # Errors
/// [`Error::Hip`] when `ptr` is not exportable device memory of `device`.
pub fn export(device: &HipDevice, ptr: u64) -> Result<(IpcHandle, u64)> {
    let (base, _) = allocation_range(device, ptr)?;
    let mut raw = hipIpcMemHandle_t { reserved: [0; IPC_HANDLE_BYTES] };
    // SAFETY: `raw` is a valid out parameter; `base` is the start of a device allocation.
    check("hipIpcGetMemHandle", unsafe { hipIpcGetMemHandle(&mut raw, base as *mut c_void) })?;
    Ok((handle_from_raw(&raw), ptr - base))
}

/// Which device memory an [`IpcBuffer`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// Ordinary device memory (`hipMalloc`): data buffers.
    Device,
    /// Uncached device memory (`hipExtMallocWithFlags` with `hipDeviceMallocUncached`): the
    /// flags of signal areas, which peers poll.
    Uncached,
}

/// Device memory exportable to peers, freed on drop.
pub struct IpcBuffer {
    device: Arc<HipDevice>,
    ptr: u64,
    bytes: usize,
}

impl IpcBuffer {
    /// Allocate `bytes` of ordinary device memory (data buffers) on `device`; as
    /// [`IpcBuffer::alloc_memory`].
    ///
    /// # Errors
    /// As [`IpcBuffer::alloc_memory`].
    pub fn alloc(device: &Arc<HipDevice>, bytes: usize) -> Result<Self> {
        Self::alloc_memory(device, bytes, Memory::Device)
    }

    /// Allocate `bytes` of uncached device memory (what peers poll: flags, packets) on
    /// `device`; as [`IpcBuffer::alloc_memory`].
    ///
    /// # Errors
    /// As [`IpcBuffer::alloc_memory`].
    pub fn alloc_signal(device: &Arc<HipDevice>, bytes: usize) -> Result<Self> {
        Self::alloc_memory(device, bytes, Memory::Uncached)
    }

    /// Allocate `bytes` of `memory` on `device`, rounded up to [`IPC_GRANULARITY`] (at least
    /// one granule). The contents are undefined: call [`IpcBuffer::zero`] before peers read
    /// flags from it.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where HIP can use no AMD GPU; [`Error::Hip`] when the allocation
    /// fails (out of memory, or uncached memory this runtime does not offer).
    pub fn alloc_memory(device: &Arc<HipDevice>, bytes: usize, memory: Memory) -> Result<Self> {
        device.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let size = rounded(bytes);
        let (op, status) = match memory {
            // SAFETY: `ptr` is a valid out parameter.
            Memory::Device => ("hipMalloc", unsafe { hipMalloc(&mut ptr, size) }),
            Memory::Uncached => (
                "hipExtMallocWithFlags(hipDeviceMallocUncached)",
                // SAFETY: as above; the flag is HIP's value for uncached device memory.
                unsafe { hipExtMallocWithFlags(&mut ptr, size, HIP_DEVICE_MALLOC_UNCACHED) },
            ),
        };
        check(op, status)?;
        Ok(IpcBuffer { device: device.clone(), ptr: ptr as u64, bytes })
    }

    /// Fill with zero bytes and wait for it (before the MPI barrier that lets peers in).
    ///
    /// # Errors
    /// [`Error::Hip`] when the memset fails.
    pub fn zero(&self) -> Result<()> {
        self.fill(0)
    }

    /// Set every byte to `byte` and wait for it.
    ///
    /// # Errors
    /// [`Error::Hip`] when the memset fails.
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the range is this allocation.
        check("hipMemset", unsafe { hipMemset(self.ptr as *mut c_void, i32::from(byte), self.bytes) })?;
        self.device.synchronize()
    }

    /// Zero `bytes` at `offset` and wait for it.
    ///
    /// # Errors
    /// [`Error::Internal`] when the range does not fit, [`Error::Hip`] when the memset fails.
    pub fn zero_at(&self, offset: usize, bytes: usize) -> Result<()> {
        check_range("IpcBuffer::zero_at", offset, bytes, self.bytes)?;
        self.device.bind()?;
        // SAFETY: the range lies inside this allocation (checked).
        check("hipMemset", unsafe { hipMemset((self.ptr + offset as u64) as *mut c_void, 0, bytes) })?;
        Self::wait_null_stream()
    }

    /// Copy `data` into the buffer at `offset` and wait for it.
    ///
    /// # Errors
    /// [`Error::Internal`] when `data` does not fit, [`Error::Hip`] when the copy fails.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        check_range("IpcBuffer::write_at", offset, data.len(), self.bytes)?;
        self.device.bind()?;
        // SAFETY: destination range checked above; the source is a live host slice.
        check("hipMemcpy(HostToDevice)", unsafe {
            hipMemcpy(
                (self.ptr + offset as u64) as *mut c_void,
                data.as_ptr().cast(),
                data.len(),
                hipMemcpyKind::hipMemcpyHostToDevice,
            )
        })?;
        // As on CUDA: kernels on non-blocking streams are not ordered after the null stream that
        // carried the copy, so wait for it before any kernel may read the bytes.
        Self::wait_null_stream()
    }

    /// Wait for the null stream of the current device.
    fn wait_null_stream() -> Result<()> {
        // SAFETY: a null stream is the current device's null stream.
        check("hipStreamSynchronize(null)", unsafe { hipStreamSynchronize(std::ptr::null_mut()) })
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The handle peers open with [`PeerMappings::open`].
    ///
    /// # Errors
    /// [`Error::Hip`] when HIP refuses to export.
    pub fn handle(&self) -> Result<IpcHandle> {
        Ok(export(&self.device, self.ptr)?.0)
    }
}

impl Drop for IpcBuffer {
    fn drop(&mut self) {
        // Never panic in Drop: the device keeps the first error for `check_err()`.
        // SAFETY: allocated in `alloc` and freed only here (hipFree frees both kinds).
        self.device.release("hipFree", || unsafe { hipFree(self.ptr as *mut c_void) });
    }
}

/// Peers' allocations mapped into this process, opened once per handle.
pub struct PeerMappings {
    device: Arc<HipDevice>,
    opened: HashMap<IpcHandle, u64>,
}

impl PeerMappings {
    /// No mappings yet.
    pub fn new(device: &Arc<HipDevice>) -> Self {
        PeerMappings { device: device.clone(), opened: HashMap::new() }
    }

    /// The local address of the allocation behind `handle`, opening it on first use
    /// (`hipIpcOpenMemHandle` with `hipIpcMemLazyEnablePeerAccess`).
    ///
    /// # Errors
    /// [`Error::Hip`] when HIP cannot open the handle (peer access impossible, or a handle of
    /// this process itself).
    pub fn open(&mut self, handle: &IpcHandle) -> Result<u64> {
        if let Some(&p) = self.opened.get(handle) {
            return Ok(p);
        }
        self.device.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out parameter; the handle is passed by value.
        check("hipIpcOpenMemHandle", unsafe {
            hipIpcOpenMemHandle(&mut ptr, handle_to_raw(handle), hipIpcMemLazyEnablePeerAccess)
        })?;
        self.opened.insert(*handle, ptr as u64);
        Ok(ptr as u64)
    }

    /// Close the mapping of `handle` (a buffer every rank released); nothing if it is not open.
    pub fn close(&mut self, handle: &IpcHandle) {
        if let Some(ptr) = self.opened.remove(handle) {
            // SAFETY: opened by hipIpcOpenMemHandle and closed once (removed from the map).
            self.device.release("hipIpcCloseMemHandle", || unsafe { hipIpcCloseMemHandle(ptr as *mut c_void) });
        }
    }
}

impl Drop for PeerMappings {
    fn drop(&mut self) {
        for (_, ptr) in self.opened.drain() {
            // SAFETY: opened by hipIpcOpenMemHandle and closed once.
            self.device.release("hipIpcCloseMemHandle", || unsafe { hipIpcCloseMemHandle(ptr as *mut c_void) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::hip::device::select_arch;
    use crate::runtime::hip::rocm_device_count;

    #[test]
    fn handle_bytes_round_trip() {
        let h: [u8; IPC_HANDLE_BYTES] = std::array::from_fn(|i| (i * 7 + 200) as u8);
        let raw = handle_to_raw(&IpcHandle(h));
        assert_eq!(raw.reserved[0] as u8, 200);
        assert_eq!(handle_from_raw(&raw).0, h);
    }

    #[test]
    fn ranges_must_lie_inside_the_buffer() {
        for (offset, bytes, len) in [(0, 0, 0), (0, 64, 64), (60, 4, 64), (64, 0, 64)] {
            assert!(check_range("t", offset, bytes, len).is_ok(), "{bytes} at {offset} of {len}");
        }
        for (offset, bytes, len) in [(0, 1, 0), (0, 65, 64), (61, 4, 64), (65, 0, 64), (usize::MAX, 2, 64)] {
            match check_range("IpcBuffer::write_at", offset, bytes, len) {
                Err(Error::Internal(m)) => assert!(m.starts_with("IpcBuffer::write_at:"), "{m}"),
                other => panic!("{bytes} at {offset} of {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn buffers_take_whole_granules() {
        assert_eq!(rounded(0), IPC_GRANULARITY);
        assert_eq!(rounded(1), IPC_GRANULARITY);
        assert_eq!(rounded(IPC_GRANULARITY), IPC_GRANULARITY);
        assert_eq!(rounded(IPC_GRANULARITY + 1), 2 * IPC_GRANULARITY);
    }

    /// The real runtime: without an AMD GPU, both kinds of allocation are Unsupported.
    #[test]
    fn buffers_without_an_amd_gpu_are_unsupported() {
        if rocm_device_count().is_ok() {
            return; // a machine with an AMD GPU: the answer below is for machines without one
        }
        let dev = HipDevice::assumed(0, select_arch("gfx90a").unwrap());
        for memory in [Memory::Device, Memory::Uncached] {
            match IpcBuffer::alloc_memory(&dev, 4096, memory) {
                Err(Error::Unsupported { .. }) => {}
                Err(e) => panic!("{memory:?}: {e}"),
                Ok(_) => panic!("{memory:?}: a buffer without an AMD GPU"),
            }
        }
        // Opening a peer's handle needs a device too.
        match PeerMappings::new(&dev).open(&IpcHandle([0; IPC_HANDLE_BYTES])) {
            Err(Error::Unsupported { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
