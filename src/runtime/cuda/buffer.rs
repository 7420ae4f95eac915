//! The memory behind a [`DeviceBuffer`] in the default build, and its cudarc face: views,
//! [`DeviceSlice`], [`DevicePtr`] and [`DevicePtrMut`], so a buffer goes wherever cudarc takes
//! device memory.
//!
//! The memory is `cuMemAlloc` memory (which, unlike cudarc's stream-ordered pools, can be
//! exported over CUDA IPC) seen through a `CudaSlice` that is never handed out (only views of
//! it), so safe code cannot swap the memory under the buffer (which would free IPC memory
//! twice), and that is leaked, never freed by cudarc, on drop:
//!
//! ```compile_fail,E0614
//! # fn f(comm: &tpcomm::Communicator, stream: &std::sync::Arc<tpcomm::cudarc::driver::CudaStream>)
//! # -> tpcomm::Result<()> {
//! let mut buf = comm.alloc_shared::<f32>(1024)?;
//! let other = stream.alloc_zeros::<f32>(1024)?;
//! *buf = other; // refused: a DeviceBuffer cannot be dereferenced into a CudaSlice
//! # Ok(()) }
//! ```

use super::{Context, Stream};
use crate::device::buffer::DeviceBuffer;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::mem::ManuallyDrop;
use std::ops::RangeBounds;
use std::sync::Arc;

/// `len` elements of `T` at an address tpcomm allocated, as a cudarc slice of the context's
/// default stream that cudarc never frees.
pub(crate) struct DeviceMemory<T>(ManuallyDrop<CudaSlice<T>>);

impl<T> DeviceMemory<T> {
    /// The memory at `ptr`.
    ///
    /// # Safety
    /// `ptr` is device memory of `ctx` holding `len` elements of `T`, which outlives the value
    /// (its owner is kept beside it).
    pub(crate) unsafe fn new(ctx: &Arc<Context>, ptr: u64, len: usize) -> Self {
        // SAFETY: the caller's contract; the slice is leaked, never freed by cudarc, in Drop.
        DeviceMemory(ManuallyDrop::new(unsafe { ctx.default_stream().upgrade_device_ptr::<T>(ptr, len) }))
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl<T> Drop for DeviceMemory<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; cudarc must not free memory it did not allocate.
        let slice = unsafe { ManuallyDrop::take(&mut self.0) };
        let _ = slice.leak();
    }
}

impl<T> DeviceBuffer<T> {
    /// The whole buffer, to read.
    pub fn as_view(&self) -> CudaView<'_, T> {
        self.memory.0.as_view()
    }

    /// The whole buffer, to write.
    pub fn as_view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.memory.0.as_view_mut()
    }

    /// Elements `range`, to read.
    ///
    /// # Panics
    /// When `range` is out of bounds, as cudarc's `slice`.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> CudaView<'_, T> {
        self.memory.0.slice(range)
    }

    /// Elements `range`, to write.
    ///
    /// # Panics
    /// When `range` is out of bounds, as cudarc's `slice_mut`.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> CudaViewMut<'_, T> {
        self.memory.0.slice_mut(range)
    }
}

impl<T> DeviceSlice<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        self.memory.0.len()
    }
    fn stream(&self) -> &Arc<Stream> {
        DeviceSlice::stream(&*self.memory.0)
    }
}

impl<T> DevicePtr<T> for DeviceBuffer<T> {
    fn device_ptr<'a>(&'a self, stream: &'a Stream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.memory.0.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for DeviceBuffer<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a Stream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.memory.0.device_ptr_mut(stream)
    }
}
