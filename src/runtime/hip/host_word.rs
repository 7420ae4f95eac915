//! Host memory kernels reach: the mapped error word ([`HostWord`], one 64-bit word of pinned
//! host memory that kernels store into and the host reads without a copy) and a registered page
//! ([`MappedHostPage`], the node's fault page); the HIP counterparts of the CUDA side's types of
//! the same names.
//!
//! The word comes from `hipHostMalloc` (mapped, portable and coherent: coherent so that a
//! kernel's store reaches the host while other kernels still run, whatever `HIP_HOST_COHERENT`
//! says) and its device address from `hipHostGetDevicePointer`. As on CUDA it is allocated for
//! the calling thread's current device: bind one first ([`super::device::HipDevice::bind`]).

use super::check;
use super::device::HipDevice;
use crate::error::Result;
use hip_runtime_sys::{
    hipHostFree, hipHostGetDevicePointer, hipHostMalloc, hipHostMallocCoherent, hipHostMallocMapped,
    hipHostMallocPortable, hipHostRegister, hipHostRegisterMapped, hipHostRegisterPortable, hipHostUnregister,
};
use std::ffi::c_void;
use std::sync::Arc;

/// One 64-bit word of pinned host memory mapped into the device address space, freed on drop.
pub struct HostWord {
    host: *mut u64,
    device: u64,
}

// SAFETY: the word is plain pinned memory; access goes through volatile reads and writes.
unsafe impl Send for HostWord {}
// SAFETY: as above; `&self` methods only read or write the word volatilely.
unsafe impl Sync for HostWord {}

impl HostWord {
    /// Allocate the word (zero) for the current device.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] where HIP can use no AMD GPU; [`crate::Error::Hip`] when
    /// the pinned allocation or its mapping fails.
    pub fn new() -> Result<Self> {
        let mut host: *mut c_void = std::ptr::null_mut();
        let flags = hipHostMallocMapped | hipHostMallocPortable | hipHostMallocCoherent;
        // SAFETY: `host` is a valid out pointer; 8 bytes are requested.
        check("hipHostMalloc(error word)", unsafe { hipHostMalloc(&mut host, 8, flags) })?;
        let host = host.cast::<u64>();
        // SAFETY: freshly allocated, 8 bytes, page aligned.
        unsafe { host.write_volatile(0) };
        let mut device: *mut c_void = std::ptr::null_mut();
        // SAFETY: `host` came from hipHostMalloc with the mapped flag.
        let r = unsafe { hipHostGetDevicePointer(&mut device, host.cast(), 0) };
        if let Err(e) = check("hipHostGetDevicePointer(error word)", r) {
            // SAFETY: allocated above and not used after; the free's own status adds nothing
            // to the error returned.
            let _ = unsafe { hipHostFree(host.cast()) };
            return Err(e);
        }
        Ok(HostWord { host, device: device as u64 })
    }

    /// The address kernels write to.
    pub fn device_ptr(&self) -> u64 {
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
        // SAFETY: allocated by hipHostMalloc in `new`; freed once. A failure cannot be reported
        // from Drop and leaks 8 bytes at worst.
        let _ = unsafe { hipHostFree(self.host.cast()) };
    }
}

/// Host memory (a page of a shared-memory segment) registered with HIP and mapped into the
/// device address space (`hipHostRegister` with `hipHostRegisterMapped`), so kernels read and
/// write the very words the host and other processes of the node see. Unregistered on drop.
/// Whether a kernel's store to registered (not `hipHostMalloc`ed coherent) memory reaches other
/// processes while the kernel runs is not checked on AMD hardware.
pub(crate) struct MappedHostPage {
    host: *mut u8,
    device_ptr: u64,
    device: Arc<HipDevice>,
}

impl MappedHostPage {
    /// Register `bytes` at `host` (page aligned) for `device`.
    ///
    /// # Safety
    /// `host` must stay mapped for `bytes` bytes until the returned value is dropped.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] where HIP can use no AMD GPU; [`crate::Error::Hip`] when
    /// HIP refuses the registration.
    pub(crate) unsafe fn register(device: &Arc<HipDevice>, host: *mut u8, bytes: usize) -> Result<Self> {
        device.bind()?;
        let flags = hipHostRegisterMapped | hipHostRegisterPortable;
        // SAFETY: the caller keeps the range mapped; the flags ask for a device mapping.
        check("hipHostRegister(fault page)", unsafe { hipHostRegister(host.cast(), bytes, flags) })?;
        let mut mapped: *mut c_void = std::ptr::null_mut();
        // SAFETY: registered just above with the mapped flag.
        let r = unsafe { hipHostGetDevicePointer(&mut mapped, host.cast(), 0) };
        if let Err(e) = check("hipHostGetDevicePointer(fault page)", r) {
            // SAFETY: registered above, not used after; the error returned says enough.
            let _ = unsafe { hipHostUnregister(host.cast()) };
            return Err(e);
        }
        Ok(MappedHostPage { host, device_ptr: mapped as u64, device: device.clone() })
    }

    /// The device address of the first byte.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.device_ptr
    }
}

impl Drop for MappedHostPage {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, unregistered once; a failure is kept by the device.
        self.device.release("hipHostUnregister(fault page)", || unsafe { hipHostUnregister(self.host.cast()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::runtime::hip::rocm_device_count;

    /// The real runtime: without an AMD GPU, the pinned mapped word is Unsupported.
    #[test]
    fn a_host_word_without_an_amd_gpu_is_unsupported() {
        if rocm_device_count().is_ok() {
            return; // a machine with an AMD GPU: the answer below is for machines without one
        }
        match HostWord::new() {
            Err(Error::Unsupported { what, .. }) => assert!(what.contains("hipHostMalloc"), "{what}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a mapped host word without an AMD GPU"),
        }
    }

    /// The real runtime: without an AMD GPU, registering a page is Unsupported.
    #[test]
    fn a_mapped_host_page_without_an_amd_gpu_is_unsupported() {
        if rocm_device_count().is_ok() {
            return; // a machine with an AMD GPU: the answer below is for machines without one
        }
        let dev = crate::runtime::hip::device::HipDevice::assumed(
            0,
            crate::runtime::hip::device::select_arch("gfx90a").unwrap(),
        );
        let mut page = vec![0u64; 512];
        // SAFETY: the vector outlives the (failed) registration.
        match unsafe { MappedHostPage::register(&dev, page.as_mut_ptr().cast(), 4096) } {
            Err(Error::Unsupported { what, .. }) => assert!(what.contains("hipSetDevice"), "{what}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a mapped page without an AMD GPU"),
        }
    }
}
