//! Device memory in a ROCm build: the device-pointer traits of the public API, views, an owned
//! slice, and the memory behind a [`DeviceBuffer`]; what cudarc's `DevicePtr`, `CudaView` and
//! `CudaSlice` are to the CUDA build, with the same shape.
//!
//! [`DevicePtr::device_ptr`] and [`DevicePtrMut::device_ptr_mut`] return the address and a guard,
//! as cudarc's do (`let (ptr, _record) = buf.device_ptr(&stream)`), so `Communicator::all_reduce`
//! and the norm calls are one code for both vendors. cudarc's guard records events so that a
//! slice used on a second stream is ordered after the first; tpcomm's HIP guard
//! ([`SyncOnDrop`]) does nothing: work on one stream is ordered by the stream, and ordering
//! across streams is the application's (with `hipEvent`s), as in HIP itself.
//!
//! [`HipSlice`] is owned device memory (`hipMalloc`, freed on drop) made by
//! [`HipStream::alloc_zeros`]; [`HipStream::memcpy_htod`] and [`HipStream::memcpy_dtoh`] copy
//! between it (or any [`DevicePtr`]) and host slices, waiting for the copy. Views
//! ([`DeviceView`], [`DeviceViewMut`]) borrow a range of a slice or a buffer.

use super::check;
use super::device::HipDevice;
use super::stream::HipStream;
use crate::device::buffer::DeviceBuffer;
use crate::error::{Error, Result};
use crate::Element;
use hip_runtime_sys::{hipFree, hipMalloc, hipMemcpyAsync, hipMemcpyKind, hipMemsetD8Async, hipStreamSynchronize};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::{Bound, Range, RangeBounds};
use std::sync::Arc;

/// The guard [`DevicePtr::device_ptr`] returns, to drop after the work using the address is
/// enqueued (cudarc's idiom). It records nothing on HIP (see the module documentation).
#[derive(Debug)]
pub struct SyncOnDrop<'a>(PhantomData<&'a ()>);

/// Device memory of some length of `T` (`tpcomm::DeviceSlice` in a ROCm build).
pub trait DeviceSlice<T> {
    /// Elements.
    fn len(&self) -> usize;
    /// Bytes.
    fn num_bytes(&self) -> usize {
        self.len() * size_of::<T>()
    }
    /// True for no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Device memory whose address can be read for work on a stream (`tpcomm::DevicePtr` in a ROCm
/// build; the shape of cudarc's trait).
pub trait DevicePtr<T>: DeviceSlice<T> {
    /// The address, to read the memory in work enqueued on `stream`; drop the guard after that
    /// work is enqueued.
    fn device_ptr<'a>(&'a self, stream: &'a HipStream) -> (u64, SyncOnDrop<'a>);
}

/// Device memory whose address can be written through (`tpcomm::DevicePtrMut` in a ROCm build).
pub trait DevicePtrMut<T>: DeviceSlice<T> {
    /// The address, to write the memory in work enqueued on `stream`; drop the guard after that
    /// work is enqueued.
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a HipStream) -> (u64, SyncOnDrop<'a>);
}

/// The elements `range` names in memory of `len` elements, `None` when out of bounds.
fn sub_range(len: usize, range: impl RangeBounds<usize>) -> Option<Range<usize>> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1)?,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    (start <= end && end <= len).then_some(start..end)
}

/// `(address, len)` of elements `range` of `len` elements of `T` at `ptr`.
///
/// # Panics
/// When `range` is out of bounds, as cudarc's `slice`.
fn sub<T>(ptr: u64, len: usize, range: impl RangeBounds<usize>) -> (u64, usize) {
    let r = sub_range(len, range).unwrap_or_else(|| panic!("a view out of bounds of {len} elements"));
    (ptr + (r.start * size_of::<T>()) as u64, r.len())
}

/// Elements of device memory borrowed to read.
#[derive(Debug)]
pub struct DeviceView<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a [T]>,
}

/// Elements of device memory borrowed to write.
#[derive(Debug)]
pub struct DeviceViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> DeviceView<'a, T> {
    fn new(ptr: u64, len: usize) -> Self {
        DeviceView { ptr, len, _borrow: PhantomData }
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.ptr
    }

    /// Elements `range` of this view.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> DeviceView<'a, T> {
        let (ptr, len) = sub::<T>(self.ptr, self.len, range);
        DeviceView::new(ptr, len)
    }
}

impl<T> DeviceViewMut<'_, T> {
    fn new(ptr: u64, len: usize) -> Self {
        DeviceViewMut { ptr, len, _borrow: PhantomData }
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.ptr
    }

    /// Elements `range` of this view, to read.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> DeviceView<'_, T> {
        let (ptr, len) = sub::<T>(self.ptr, self.len, range);
        DeviceView::new(ptr, len)
    }

    /// Elements `range` of this view, to write.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> DeviceViewMut<'_, T> {
        let (ptr, len) = sub::<T>(self.ptr, self.len, range);
        DeviceViewMut::new(ptr, len)
    }
}

/// The trait impls of a type that holds `(ptr, len)` of `T`, read-only or writable.
macro_rules! device_memory {
    (read $ty:ty) => {
        impl<T> DeviceSlice<T> for $ty {
            fn len(&self) -> usize {
                self.len
            }
        }
        impl<T> DevicePtr<T> for $ty {
            fn device_ptr<'a>(&'a self, _stream: &'a HipStream) -> (u64, SyncOnDrop<'a>) {
                (self.ptr, SyncOnDrop(PhantomData))
            }
        }
    };
    (write $ty:ty) => {
        device_memory!(read $ty);
        impl<T> DevicePtrMut<T> for $ty {
            fn device_ptr_mut<'a>(&'a mut self, _stream: &'a HipStream) -> (u64, SyncOnDrop<'a>) {
                (self.ptr, SyncOnDrop(PhantomData))
            }
        }
    };
}

device_memory!(read DeviceView<'_, T>);
device_memory!(write DeviceViewMut<'_, T>);
device_memory!(write HipSlice<T>);
device_memory!(write DeviceMemory<T>);

/// Owned device memory of `len` elements of `T` (`hipMalloc`), freed on drop: what cudarc's
/// `CudaSlice` is on CUDA. Made by [`HipStream::alloc_zeros`].
pub struct HipSlice<T> {
    device: Arc<HipDevice>,
    ptr: u64,
    len: usize,
    _elements: PhantomData<T>,
}

// SAFETY: the slice is a device address plus its device; HIP calls are thread safe, and the
// elements are plain numbers (`Element`) reached only through HIP.
unsafe impl<T: Send> Send for HipSlice<T> {}
// SAFETY: as above; `&self` methods only hand out the address.
unsafe impl<T: Sync> Sync for HipSlice<T> {}

impl<T> HipSlice<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole slice, to read.
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView::new(self.ptr, self.len)
    }

    /// The whole slice, to write.
    pub fn as_view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut::new(self.ptr, self.len)
    }

    /// Elements `range`, to read.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> DeviceView<'_, T> {
        self.as_view().slice(range)
    }

    /// Elements `range`, to write.
    ///
    /// # Panics
    /// When `range` is out of bounds.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> DeviceViewMut<'_, T> {
        let (ptr, len) = sub::<T>(self.ptr, self.len, range);
        DeviceViewMut::new(ptr, len)
    }
}

impl<T> std::fmt::Debug for HipSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HipSlice({} elements at {:#x})", self.len, self.ptr)
    }
}

impl<T> Drop for HipSlice<T> {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by hipMalloc in `alloc_zeros` and freed only here.
            self.device.release("hipFree", || unsafe { hipFree(self.ptr as *mut c_void) });
        }
    }
}

/// The memory behind a [`DeviceBuffer`] in a ROCm build: `len` elements of `T` at an address of
/// an `IpcBuffer` the buffer keeps beside it.
pub(crate) struct DeviceMemory<T> {
    ptr: u64,
    len: usize,
    _elements: PhantomData<T>,
}

impl<T> DeviceMemory<T> {
    /// The memory at `ptr`.
    ///
    /// # Safety
    /// `ptr` is device memory of `device` holding `len` elements of `T`, which outlives the
    /// value (its owner is kept beside it).
    pub(crate) unsafe fn new(_device: &Arc<HipDevice>, ptr: u64, len: usize) -> Self {
        DeviceMemory { ptr, len, _elements: PhantomData }
    }

    /// Elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl<T> DeviceBuffer<T> {
    /// The whole buffer, to read.
    pub fn as_view(&self) -> DeviceView<'_, T> {
        DeviceView::new(self.memory.ptr, self.memory.len)
    }

    /// The whole buffer, to write.
    pub fn as_view_mut(&mut self) -> DeviceViewMut<'_, T> {
        DeviceViewMut::new(self.memory.ptr, self.memory.len)
    }

    /// Elements `range`, to read.
    ///
    /// # Panics
    /// When `range` is out of bounds, as cudarc's `slice` on CUDA.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> DeviceView<'_, T> {
        self.as_view().slice(range)
    }

    /// Elements `range`, to write.
    ///
    /// # Panics
    /// When `range` is out of bounds, as cudarc's `slice_mut` on CUDA.
    pub fn slice_mut(&mut self, range: impl RangeBounds<usize>) -> DeviceViewMut<'_, T> {
        let (ptr, len) = sub::<T>(self.memory.ptr, self.memory.len, range);
        DeviceViewMut::new(ptr, len)
    }
}

impl<T> DeviceSlice<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        self.memory.len
    }
}

impl<T> DevicePtr<T> for DeviceBuffer<T> {
    fn device_ptr<'a>(&'a self, stream: &'a HipStream) -> (u64, SyncOnDrop<'a>) {
        self.memory.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for DeviceBuffer<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a HipStream) -> (u64, SyncOnDrop<'a>) {
        self.memory.device_ptr_mut(stream)
    }
}

/// `(bytes, op)` of a copy of `host` elements to or from `device` elements.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `op` when the lengths differ.
fn copy_bytes<T>(op: &'static str, host: usize, device: usize) -> Result<usize> {
    if host != device {
        return Err(Error::invalid(op, format!("{host} host elements and {device} device elements")));
    }
    Ok(host * size_of::<T>())
}

impl HipStream {
    /// `len` zeroed elements of `T` on this stream's device (`hipMalloc`, then a memset on this
    /// stream), freed on drop: cudarc's `alloc_zeros`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] where HIP can use no AMD GPU; [`Error::Hip`] (out of memory).
    pub fn alloc_zeros<T: Element>(self: &Arc<Self>, len: usize) -> Result<HipSlice<T>> {
        self.device().bind()?;
        let bytes = len * size_of::<T>();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        if bytes > 0 {
            // SAFETY: a valid out pointer.
            check("hipMalloc", unsafe { hipMalloc(&mut ptr, bytes) })?;
        }
        let slice = HipSlice { device: self.device().clone(), ptr: ptr as u64, len, _elements: PhantomData };
        if bytes > 0 {
            // SAFETY: the allocation just made, `bytes` long; stream-ordered before any later
            // work of this stream.
            check("hipMemsetD8Async", unsafe { hipMemsetD8Async(ptr, 0, bytes, self.raw()) })?;
        }
        Ok(slice)
    }

    /// Copy `src` into `dst` (of the same length) and wait for the copy: cudarc's
    /// `memcpy_htod`, which returns before it lands; this one returns after, as `src` is only
    /// borrowed for the call.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for different lengths; [`Error::Hip`].
    pub fn memcpy_htod<T: Element, D: DevicePtrMut<T>>(&self, src: &[T], dst: &mut D) -> Result<()> {
        let bytes = copy_bytes::<T>("HipStream::memcpy_htod", src.len(), dst.len())?;
        let (ptr, _record) = dst.device_ptr_mut(self);
        self.device().bind()?;
        // SAFETY: `dst` is device memory of `bytes` bytes (its length, checked), `src` a live
        // host slice of as many; the stream is waited for before `src` is released.
        check("hipMemcpyAsync(HostToDevice)", unsafe {
            hipMemcpyAsync(
                ptr as *mut c_void,
                src.as_ptr().cast(),
                bytes,
                hipMemcpyKind::hipMemcpyHostToDevice,
                self.raw(),
            )
        })?;
        // SAFETY: a live stream.
        check("hipStreamSynchronize(memcpy_htod)", unsafe { hipStreamSynchronize(self.raw()) })
    }

    /// Copy `src` (of the same length) into `dst` and wait for the copy: cudarc's `memcpy_dtoh`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for different lengths; [`Error::Hip`].
    pub fn memcpy_dtoh<T: Element, S: DevicePtr<T>>(&self, src: &S, dst: &mut [T]) -> Result<()> {
        let bytes = copy_bytes::<T>("HipStream::memcpy_dtoh", dst.len(), src.len())?;
        let (ptr, _record) = src.device_ptr(self);
        self.device().bind()?;
        // SAFETY: as in `memcpy_htod`; every bit pattern is a valid `Element` (numbers only).
        check("hipMemcpyAsync(DeviceToHost)", unsafe {
            hipMemcpyAsync(
                dst.as_mut_ptr().cast(),
                ptr as *const c_void,
                bytes,
                hipMemcpyKind::hipMemcpyDeviceToHost,
                self.raw(),
            )
        })?;
        // SAFETY: a live stream.
        check("hipStreamSynchronize(memcpy_dtoh)", unsafe { hipStreamSynchronize(self.raw()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::hip::device::select_arch;

    #[test]
    fn hip_view_ranges_follow_slice_indexing() {
        assert_eq!(sub_range(10, ..), Some(0..10));
        assert_eq!(sub_range(10, 2..5), Some(2..5));
        assert_eq!(sub_range(10, 2..=5), Some(2..6));
        assert_eq!(sub_range(10, 10..), Some(10..10));
        assert_eq!(sub_range(10, ..=9), Some(0..10));
        for bad in [
            sub_range(10, 11..),
            sub_range(10, ..11),
            sub_range(10, (Bound::Included(5), Bound::Excluded(4))),
            sub_range(10, ..=usize::MAX),
        ] {
            assert_eq!(bad, None);
        }
    }

    /// Views of a buffer's memory name the right addresses and lengths.
    #[test]
    fn hip_views_and_device_pointers_offset_by_whole_elements() {
        let dev = HipDevice::assumed(0, select_arch("gfx942").unwrap());
        // SAFETY: the address is never dereferenced: only the bookkeeping is checked.
        let mem = unsafe { DeviceMemory::<u32>::new(&dev, 0x1000, 64) };
        assert_eq!((mem.len(), DeviceSlice::<u32>::num_bytes(&mem)), (64, 256));
        let view = DeviceView::<u32>::new(mem.ptr, mem.len);
        let part = view.slice(8..24);
        assert_eq!((part.device_address(), DeviceSlice::len(&part)), (0x1000 + 32, 16));
        let inner = part.slice(1..);
        assert_eq!((inner.device_address(), DeviceSlice::len(&inner)), (0x1000 + 36, 15));
        let mut w = DeviceViewMut::<u32>::new(mem.ptr, mem.len);
        let w2 = w.slice_mut(63..);
        assert_eq!((w2.device_address(), DeviceSlice::len(&w2)), (0x1000 + 252, 1));
        assert!(DeviceSlice::is_empty(&w.slice(64..)));
    }

    #[test]
    #[should_panic(expected = "out of bounds of 4 elements")]
    fn hip_views_out_of_bounds_panic_as_cudarc_does() {
        let _ = sub::<f32>(0x1000, 4, 2..5);
    }

    #[test]
    fn hip_copies_must_match_lengths() {
        assert_eq!(copy_bytes::<f32>("c", 4, 4).unwrap(), 16);
        assert_eq!(copy_bytes::<u16>("c", 0, 0).unwrap(), 0);
        assert!(matches!(copy_bytes::<f32>("c", 4, 5), Err(Error::InvalidArgument { op: "c", .. })));
    }
}
