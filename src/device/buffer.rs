//! Device memory tpcomm allocates for the application, and the queue that returns it.
//!
//! A [`DeviceBuffer`] is exportable device memory tpcomm allocated (an `IpcBuffer`), typed, with
//! the vendor's face: in the default build the CUDA driver crate's views and device-pointer
//! traits, in a ROCm build tpcomm's HIP views and traits of the same shape (`runtime/cuda/buffer.rs`,
//! `runtime/hip/buffer.rs`). It hands out views only, never the memory itself, so safe code
//! cannot swap the memory under it (which would free IPC memory twice).
//!
//! Peers map the memory of [`crate::Communicator::alloc_shared`], so dropping a buffer on one
//! rank must not free memory a peer still reads: the drop only queues a release. At the next
//! collective point (the next `alloc_shared`, a registration's `finish`, `finalize`) the ranks
//! agree which buffers every rank released; those are unmapped by the peers and then freed.

use crate::runtime::ipc::IpcBuffer;
use crate::runtime::{Context, DeviceMemory};
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

/// Device memory tpcomm allocated, usable wherever the vendor's device memory goes: it
/// implements [`crate::DevicePtr`] and [`crate::DevicePtrMut`] (the CUDA driver crate's traits in
/// the default build) and hands out views (`as_view`, `slice`, ...). From
/// [`crate::Communicator::alloc_shared`] it is registered with every peer, so allreduces whose
/// input lies in it copy nothing; from [`crate::Communicator::alloc_device`] it is not, but
/// graphs capturing allreduces of it read it in place (it can be exported over IPC, unlike
/// stream-ordered pool allocations).
pub struct DeviceBuffer<T> {
    /// The typed memory (vendor's); dropped before `mem`, which frees it.
    pub(crate) memory: DeviceMemory<T>,
    mem: Arc<IpcBuffer>,
    release: Release,
}

impl<T> DeviceBuffer<T> {
    /// Wrap `mem` (holding `len` elements of `T`) for `ctx`'s GPU.
    pub(crate) fn new(ctx: &Arc<Context>, mem: Arc<IpcBuffer>, len: usize, release: Release) -> Self {
        // SAFETY: the allocation holds `len` elements of T and outlives the typed memory (the
        // Arc is kept beside it, and dropped after it).
        let memory = unsafe { DeviceMemory::new(ctx, mem.ptr(), len) };
        DeviceBuffer { memory, mem, release }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// True for a buffer of no elements.
    pub fn is_empty(&self) -> bool {
        self.memory.len() == 0
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.mem.ptr()
    }
}

impl<T> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} elements at {:#x})", self.len(), self.device_address())
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Release::Shared(queue, id) = &self.release {
            // A poisoned lock only means another drop panicked; the list is still a list.
            queue.lock().unwrap_or_else(|e| e.into_inner()).buffers.push(*id);
        }
    }
}
