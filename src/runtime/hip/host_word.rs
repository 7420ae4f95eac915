//! The mapped error word: one 64-bit word of pinned host memory that kernels store into and the
//! host reads without a copy; the HIP counterpart of `runtime::HostWord`, with the same name.
//!
//! The word comes from `hipHostMalloc` (mapped, portable and coherent: coherent so that a
//! kernel's store reaches the host while other kernels still run, whatever `HIP_HOST_COHERENT`
//! says) and its device address from `hipHostGetDevicePointer`. As on CUDA it is allocated for
//! the calling thread's current device: bind one first ([`super::device::HipDevice::bind`]).

use super::check;
use crate::error::Result;
use hip_runtime_sys::{
    hipHostFree, hipHostGetDevicePointer, hipHostMalloc, hipHostMallocCoherent, hipHostMallocMapped,
    hipHostMallocPortable,
};
use std::ffi::c_void;

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

    /// Set the word back to zero (no kernel may be writing it).
    pub fn clear(&self) {
        // SAFETY: the pointer is valid for the life of `self`.
        unsafe { self.host.write_volatile(0) }
    }
}

impl Drop for HostWord {
    fn drop(&mut self) {
        // SAFETY: allocated by hipHostMalloc in `new`; freed once. A failure cannot be reported
        // from Drop and leaks 8 bytes at worst.
        let _ = unsafe { hipHostFree(self.host.cast()) };
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
}
