//! CUDA IPC: device memory other processes can map, and the mappings of theirs we opened
//! (re-exported by `runtime::ipc` in the default build; `runtime/hip/ipc.rs` is the HIP side).
//!
//! Two facts shape this file. Memory from cudarc's stream-ordered allocator (`alloc_zeros`,
//! `clone_htod`, ...) cannot be exported (`cuIpcGetMemHandle` fails with INVALID_VALUE), so
//! shared memory comes from `cuMemAlloc_v2` ([`IpcBuffer`]). And a handle names a whole
//! allocation: [`export`] sends the handle of the allocation's base plus the offset of the
//! pointer inside it, and a process may open each handle only once, so [`PeerMappings`] caches
//! what it opened by the handle's 64 bytes and closes everything on drop.

use super::{check, cuda};
use crate::error::{Error, Result};
use crate::runtime::ipc::{IpcHandle, IPC_GRANULARITY, IPC_HANDLE_BYTES};
use cudarc::driver::{sys, CudaContext};
use std::collections::HashMap;
use std::sync::Arc;

/// CUDA's handle as the crate's bytes.
fn handle_from_raw(raw: sys::CUipcMemHandle) -> IpcHandle {
    let mut out = [0u8; IPC_HANDLE_BYTES];
    for (o, c) in out.iter_mut().zip(raw.reserved.iter()) {
        *o = *c as u8;
    }
    IpcHandle(out)
}

/// The crate's bytes as CUDA's handle.
fn handle_to_raw(handle: IpcHandle) -> sys::CUipcMemHandle {
    let mut raw = sys::CUipcMemHandle { reserved: [0; IPC_HANDLE_BYTES] };
    for (r, b) in raw.reserved.iter_mut().zip(handle.0.iter()) {
        *r = *b as std::ffi::c_char;
    }
    raw
}

/// The allocation `ptr` lies in: `(base, size)`.
///
/// # Errors
/// [`Error::Cuda`] when `ptr` is not device memory of the current context.
pub fn allocation_range(ctx: &CudaContext, ptr: sys::CUdeviceptr) -> Result<(sys::CUdeviceptr, usize)> {
    ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
    let mut base: sys::CUdeviceptr = 0;
    let mut size: usize = 0;
    // SAFETY: out pointers are valid and sized for the attributes (CUdeviceptr, size_t).
    check("cuPointerGetAttribute(RANGE_START_ADDR)", unsafe {
        sys::cuPointerGetAttribute(
            (&mut base as *mut sys::CUdeviceptr).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            ptr,
        )
    })?;
    // SAFETY: as above.
    check("cuPointerGetAttribute(RANGE_SIZE)", unsafe {
        sys::cuPointerGetAttribute(
            (&mut size as *mut usize).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            ptr,
        )
    })?;
    Ok((base, size))
}

/// The IPC handle of the allocation holding `ptr`, and `ptr`'s offset from its base.
///
/// # Errors
/// [`Error::Cuda`] when `ptr` is not exportable (for example memory from a stream-ordered
/// pool): allocate such buffers with [`IpcBuffer`] instead.
pub fn export(ctx: &CudaContext, ptr: sys::CUdeviceptr) -> Result<(IpcHandle, u64)> {
    let (base, _) = allocation_range(ctx, ptr)?;
    let mut raw = sys::CUipcMemHandle { reserved: [0; IPC_HANDLE_BYTES] };
    // SAFETY: `raw` is a valid out parameter; `base` is the start of a device allocation.
    check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut raw, base) })?;
    Ok((handle_from_raw(raw), ptr - base))
}

/// Device memory from `cuMemAlloc_v2`, exportable to peers, freed on drop.
pub struct IpcBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

// SAFETY: the buffer is a device address plus its owning context; the driver API is thread safe.
unsafe impl Send for IpcBuffer {}
// SAFETY: as above; no `&self` method mutates host state.
unsafe impl Sync for IpcBuffer {}

impl IpcBuffer {
    /// Allocate `bytes` of device memory in `ctx`, rounded up to [`IPC_GRANULARITY`] (at least
    /// one granule). The contents are undefined: call [`IpcBuffer::zero`] before peers read
    /// flags from it.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the allocation fails (out of memory).
    pub fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out parameter.
        let rounded = bytes.max(1).div_ceil(IPC_GRANULARITY) * IPC_GRANULARITY;
        check("cuMemAlloc_v2", unsafe { sys::cuMemAlloc_v2(&mut ptr, rounded) })?;
        Ok(IpcBuffer { ctx: ctx.clone(), ptr, bytes })
    }

    /// As [`IpcBuffer::alloc`], for memory peers poll (barrier flags, packets): on CUDA the same
    /// `cuMemAlloc` memory (the kernels' volatile and system-scope accesses see peers' stores);
    /// the HIP side allocates uncached memory here.
    ///
    /// # Errors
    /// As [`IpcBuffer::alloc`].
    pub fn alloc_signal(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        Self::alloc(ctx, bytes)
    }

    /// Fill with zero bytes and wait for it (before the MPI barrier that lets peers in).
    ///
    /// # Errors
    /// [`Error::Cuda`] when the memset fails.
    pub fn zero(&self) -> Result<()> {
        self.fill(0)
    }

    /// Set every byte to `byte` and wait for it.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the memset fails.
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
        // SAFETY: the range is this allocation.
        check("cuMemsetD8_v2", unsafe { sys::cuMemsetD8_v2(self.ptr, byte, self.bytes) })?;
        self.ctx.synchronize().map_err(cuda("cuCtxSynchronize"))
    }

    /// Zero `bytes` at `offset`, synchronously (legacy stream, waited for).
    ///
    /// # Errors
    /// [`Error::Internal`] when the range does not fit, [`Error::Cuda`] when the memset fails.
    pub fn zero_at(&self, offset: usize, bytes: usize) -> Result<()> {
        self.check_range("IpcBuffer::zero_at", offset, bytes)?;
        self.ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
        // SAFETY: the range lies inside this allocation (checked).
        check("cuMemsetD8_v2", unsafe { sys::cuMemsetD8_v2(self.ptr + offset as u64, 0, bytes) })?;
        // SAFETY: a null stream is the legacy default stream of the current context.
        check("cuStreamSynchronize(legacy)", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })
    }

    fn check_range(&self, op: &str, offset: usize, bytes: usize) -> Result<()> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.bytes) {
            return Err(Error::Internal(format!("{op}: {bytes} bytes at {offset} exceed the buffer's {}", self.bytes)));
        }
        Ok(())
    }

    /// Copy `data` into the buffer at `offset`, synchronously.
    ///
    /// # Errors
    /// [`Error::Internal`] when `data` does not fit, [`Error::Cuda`] when the copy fails.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_range("IpcBuffer::write_at", offset, data.len())?;
        self.ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
        // SAFETY: destination range checked above; the source is a live host slice.
        check("cuMemcpyHtoD_v2", unsafe {
            sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, data.as_ptr().cast(), data.len())
        })?;
        // From pageable memory the copy returns once the data is staged, before the DMA lands,
        // and kernels on non-blocking streams are not ordered after the legacy stream that
        // carries it: a kernel launched next could read the old bytes (seen as an illegal
        // address from a half-written rank-data row). Wait for the legacy stream.
        // SAFETY: a null stream is the legacy default stream of the current context.
        check("cuStreamSynchronize(legacy)", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })
    }

    /// The device address.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// The handle peers open with [`PeerMappings::open`].
    ///
    /// # Errors
    /// [`Error::Cuda`] when the driver refuses to export.
    pub fn handle(&self) -> Result<IpcHandle> {
        Ok(export(&self.ctx, self.ptr)?.0)
    }
}

impl Drop for IpcBuffer {
    fn drop(&mut self) {
        // Never panic in Drop: the context keeps the first error for `check_err()`.
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: allocated by cuMemAlloc_v2 in `alloc` and freed only here.
        self.ctx.record_err(unsafe { sys::cuMemFree_v2(self.ptr) }.result());
    }
}

/// Peers' allocations mapped into this process, opened once per handle.
pub struct PeerMappings {
    ctx: Arc<CudaContext>,
    opened: HashMap<IpcHandle, sys::CUdeviceptr>,
}

impl PeerMappings {
    /// No mappings yet.
    pub fn new(ctx: &Arc<CudaContext>) -> Self {
        PeerMappings { ctx: ctx.clone(), opened: HashMap::new() }
    }

    /// The local address of the allocation behind `handle`, opening it on first use.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the driver cannot open the handle (peer access impossible, or a
    /// handle of this process itself).
    pub fn open(&mut self, handle: &IpcHandle) -> Result<sys::CUdeviceptr> {
        if let Some(&p) = self.opened.get(handle) {
            return Ok(p);
        }
        self.ctx.bind_to_thread().map_err(cuda("cuCtxSetCurrent"))?;
        let mut ptr: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `ptr` is a valid out parameter; the handle is passed by value.
        check("cuIpcOpenMemHandle_v2", unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle_to_raw(*handle), flags) })?;
        self.opened.insert(*handle, ptr);
        Ok(ptr)
    }

    /// Close the mapping of `handle` (a buffer every rank released); nothing if it is not open.
    pub fn close(&mut self, handle: &IpcHandle) {
        if let Some(ptr) = self.opened.remove(handle) {
            self.ctx.record_err(self.ctx.bind_to_thread());
            // SAFETY: opened by cuIpcOpenMemHandle_v2 and closed once (removed from the map).
            self.ctx.record_err(unsafe { sys::cuIpcCloseMemHandle(ptr) }.result());
        }
    }
}

impl Drop for PeerMappings {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        for (_, ptr) in self.opened.drain() {
            // SAFETY: opened by cuIpcOpenMemHandle_v2 and closed once.
            self.ctx.record_err(unsafe { sys::cuIpcCloseMemHandle(ptr) }.result());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_bytes_round_trip() {
        let mut h = [0u8; IPC_HANDLE_BYTES];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 7 + 200) as u8;
        }
        let back = handle_from_raw(handle_to_raw(IpcHandle(h)));
        assert_eq!(back.0, h);
    }
}
