//! Device memory tpcomm allocates for the application, and the queue that returns it.
//!
//! A [`DeviceBuffer`] is `cuMemAlloc` memory (which, unlike cudarc's stream-ordered pools, can
//! be exported over CUDA IPC) seen through cudarc's views. It is *not* a `CudaSlice` one could
//! replace: there is no `DerefMut`, only views, so safe code cannot swap the memory under it
//! (which would free IPC memory twice).
//!
//! ```compile_fail,E0614
//! # fn f(comm: &tpcomm::Communicator, stream: &std::sync::Arc<tpcomm::cudarc::driver::CudaStream>)
//! # -> tpcomm::Result<()> {
//! let mut buf = comm.alloc_shared::<f32>(1024)?;
//! let other = stream.alloc_zeros::<f32>(1024)?;
//! *buf = other; // refused: a DeviceBuffer cannot be dereferenced into a CudaSlice
//! # Ok(()) }
//! ```
//!
//! Peers map the memory of [`crate::Communicator::alloc_shared`], so dropping a buffer on one
//! rank must not free memory a peer still reads: the drop only queues a release. At the next
//! collective point (the next `alloc_shared`, a registration's `finish`, `finalize`) the ranks
//! agree which buffers every rank released; those are unmapped by the peers and then freed.

use crate::runtime::ipc::IpcBuffer;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::mem::ManuallyDrop;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

/// What was dropped since the device layer last looked.
#[derive(Debug, Default)]
pub(crate) struct Released {
    /// Shared buffers (by id) this rank no longer uses.
    pub buffers: Vec<u64>,
    /// Graph registrations whose graph is gone on this rank.
    pub graphs: Vec<u64>,
}

/// The queue drops push into (buffers and graphs may live on other threads than the
/// communicator, so it is a mutex: one short lock per drop).
pub(crate) type ReleaseQueue = Arc<Mutex<Released>>;

/// What a dropped buffer tells the device layer.
#[derive(Debug)]
pub(crate) enum Release {
    /// A shared buffer: released collectively.
    Shared(ReleaseQueue, u64),
    /// Private memory: freed with the communicator (peers may have mapped it for a graph).
    Private,
}

/// Device memory from `cuMemAlloc`, usable wherever cudarc takes device memory (it implements
/// [`DevicePtr`] and [`DevicePtrMut`], and hands out views). From
/// [`crate::Communicator::alloc_shared`] it is registered with every peer, so allreduces whose
/// input lies in it copy nothing; from [`crate::Communicator::alloc_device`] it is not, but
/// CUDA graphs capturing allreduces of it read it in place (it can be exported over IPC, unlike
/// cudarc's stream-ordered allocations).
pub struct DeviceBuffer<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    mem: Arc<IpcBuffer>,
    release: Release,
}

impl<T> DeviceBuffer<T> {
    /// Wrap `mem` (holding `len` elements of `T`) for `stream`'s context.
    pub(crate) fn new(stream: &Arc<CudaStream>, mem: Arc<IpcBuffer>, len: usize, release: Release) -> Self {
        // SAFETY: the allocation holds `len` elements of T and outlives the slice (the Arc is
        // kept beside it); the slice is never handed out (only views of it), so nothing can
        // replace it, and it is leaked, never freed by cudarc, in Drop.
        let slice = unsafe { stream.upgrade_device_ptr::<T>(mem.ptr(), len) };
        DeviceBuffer { slice: ManuallyDrop::new(slice), mem, release }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// True for a buffer of no elements.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.mem.ptr()
    }

    /// The whole buffer, to read.
    pub fn as_view(&self) -> CudaView<'_, T> {
        self.slice.as_view()
    }

    /// The whole buffer, to write.
    pub fn as_view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice.as_view_mut()
    }

    /// Elements `range`, to read.
    ///
    /// # Panics
    /// When `range` is out of bounds, as cudarc's `slice`.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> CudaView<'_, T> {
        self.slice.slice(range)
    }

    /// Elements `range`, to write.
    ///
    /// # Panics
    /// When `range` is out of bounds, as cudarc's `slice_mut`.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> CudaViewMut<'_, T> {
        self.slice.slice_mut(range)
    }
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} elements at {:#x})", self.len(), self.device_address())
    }
}

impl<T> DeviceSlice<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        self.slice.len()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        DeviceSlice::stream(&*self.slice)
    }
}

impl<T> DevicePtr<T> for DeviceBuffer<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for DeviceBuffer<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr_mut(stream)
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; cudarc must not free memory it did not allocate.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let _ = slice.leak();
        if let Release::Shared(queue, id) = &self.release {
            // A poisoned lock only means another drop panicked; the list is still a list.
            queue.lock().unwrap_or_else(|e| e.into_inner()).buffers.push(*id);
        }
    }
}
