//! Loading the embedded code objects and launching their kernels: what cudarc's `CudaModule`,
//! `CudaFunction` and tpcomm's `runtime::launch` are to the CUDA side.
//!
//! [`HipModule::load`] takes the code object `build.rs` compiled for a kernel family, a world
//! size and the device's architecture, checks that it is an AMDGPU ELF for that architecture
//! (`check_amdgpu_object`) and hands it to `hipModuleLoadData`. [`HipModule::function`] looks
//! up an entry point, and [`launch`] enqueues it with `hipModuleLaunchKernel`, its arguments
//! given as a slice of pointers to their values (`crate::runtime::arg` makes them), as on CUDA.

use super::device::HipDevice;
use super::stream::HipStream;
use super::{check, check_amdgpu_object, code_object};
use crate::error::{Error, Result};
use hip_runtime_sys::{
    hipFunction_t, hipModuleGetFunction, hipModuleLaunchKernel, hipModuleLoadData,
    hipModuleOccupancyMaxActiveBlocksPerMultiprocessor, hipModuleUnload, hipModule_t,
};
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// A copy of `bin` in 8-byte aligned memory: `include_bytes!` gives no alignment, and an ELF
/// image is read as 8-byte words (whether HIP needs the alignment is not verified; the copy
/// makes the question moot).
fn aligned_copy(bin: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; bin.len().div_ceil(8)];
    for (word, chunk) in words.iter_mut().zip(bin.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    words
}

/// A loaded code object of one kernel family, unloaded on drop.
pub struct HipModule {
    device: Arc<HipDevice>,
    raw: hipModule_t,
    /// What was loaded, for errors: family, world size, architecture.
    what: String,
    /// The image handed to HIP, kept as long as the module.
    _image: Vec<u64>,
}

// SAFETY: a module handle may be used from any thread; the HIP runtime is thread safe.
unsafe impl Send for HipModule {}
// SAFETY: as above; no `&self` method changes host state.
unsafe impl Sync for HipModule {}

impl HipModule {
    /// Load the code object of kernel family `family` for `world` ranks and the device's
    /// architecture (`hipModuleLoadData`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when no code object is embedded for them (a world size above
    /// `MAX_RANKS`) or HIP can use no AMD GPU; [`Error::Internal`] when the embedded object is
    /// not an AMDGPU ELF for the architecture; [`Error::Hip`] when HIP refuses it.
    pub fn load(device: &Arc<HipDevice>, family: &str, world: usize) -> Result<Arc<Self>> {
        let arch = device.arch();
        let what = format!("{family} for {world} ranks on {}", arch.name);
        let bin = code_object(family, world, arch.name).ok_or_else(|| Error::Unsupported {
            what: format!("the kernels {what}"),
            reason: "tpcomm embeds no code object for them (build.rs compiles world sizes 1 to MAX_RANKS)".into(),
        })?;
        check_amdgpu_object(bin, arch.mach)?;
        let image = aligned_copy(bin);
        device.bind()?;
        let mut raw: hipModule_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer; `image` is a whole ELF code object (checked above), kept
        // alive as long as the module.
        check("hipModuleLoadData", unsafe { hipModuleLoadData(&mut raw, image.as_ptr().cast()) })?;
        Ok(Arc::new(HipModule { device: device.clone(), raw, what, _image: image }))
    }

    /// The kernel `name` of this module (`hipModuleGetFunction`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a name holding a NUL byte; [`Error::Hip`] when the
    /// module has no such kernel.
    pub fn function(self: &Arc<Self>, name: &str) -> Result<HipFunction> {
        let cname = CString::new(name)
            .map_err(|_| Error::invalid("HipModule::function", format!("kernel name {name:?} holds a NUL byte")))?;
        let mut raw: hipFunction_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer, a live module and a NUL-terminated name.
        check("hipModuleGetFunction", unsafe { hipModuleGetFunction(&mut raw, self.raw, cname.as_ptr()) }).map_err(
            |e| match e {
                Error::Hip { code, .. } => Error::Internal(format!(
                    "the code object of {} has no kernel {name} (hipModuleGetFunction: {code})",
                    self.what
                )),
                other => other,
            },
        )?;
        Ok(HipFunction { module: self.clone(), raw })
    }
}

impl Drop for HipModule {
    fn drop(&mut self) {
        // SAFETY: loaded in `load` and unloaded only here; every function holds the module, so
        // none outlives it.
        self.device.release("hipModuleUnload", || unsafe { hipModuleUnload(self.raw) });
    }
}

/// One kernel of a [`HipModule`]; keeps its module loaded.
pub struct HipFunction {
    module: Arc<HipModule>,
    raw: hipFunction_t,
}

// SAFETY: a function handle may be used from any thread; the HIP runtime is thread safe.
unsafe impl Send for HipFunction {}
// SAFETY: as above; no `&self` method changes host state.
unsafe impl Sync for HipFunction {}

impl HipFunction {
    /// How many blocks of `threads` threads can be resident on one compute unit
    /// (`hipModuleOccupancyMaxActiveBlocksPerMultiprocessor`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a block size HIP cannot take; [`Error::Hip`].
    pub fn max_active_blocks_per_cu(&self, threads: usize) -> Result<usize> {
        let block = i32::try_from(threads)
            .map_err(|_| Error::invalid("HipFunction::max_active_blocks_per_cu", format!("{threads} threads")))?;
        let mut blocks: i32 = 0;
        self.module.device.bind()?;
        // SAFETY: a valid out pointer and a live function handle.
        check("hipModuleOccupancyMaxActiveBlocksPerMultiprocessor", unsafe {
            hipModuleOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, self.raw, block, 0)
        })?;
        Ok(usize::try_from(blocks).unwrap_or(0))
    }
}

/// A launch's grid and block sizes as HIP takes them.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `op` for an empty grid or block, or one beyond `u32`.
fn launch_dims(op: &'static str, grid: usize, block: usize) -> Result<(u32, u32)> {
    match (u32::try_from(grid), u32::try_from(block)) {
        (Ok(g), Ok(b)) if g > 0 && b > 0 => Ok((g, b)),
        _ => Err(Error::invalid(op, format!("a launch of {grid} blocks of {block} threads"))),
    }
}

/// Launch `func` on `stream` with `grid` blocks of `block` threads (`hipModuleLaunchKernel`,
/// no dynamic shared memory). HIP has no programmatic dependent launch: kernels of one stream
/// run one after the other.
///
/// # Safety
/// `params` point to the kernel's arguments, in its order and of its types, all valid for the
/// whole run of the kernel's work.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty or oversized grid or block; [`Error::Hip`] naming
/// `op` when the launch fails.
pub unsafe fn launch(
    func: &HipFunction,
    grid: usize,
    block: usize,
    stream: &HipStream,
    params: &mut [*mut c_void],
    op: &'static str,
) -> Result<()> {
    let (g, b) = launch_dims(op, grid, block)?;
    stream.device().bind()?;
    // SAFETY: the caller's contract for `params`; the function and stream handles are live
    // for the borrows; no `extra` launch parameters.
    let r = unsafe {
        hipModuleLaunchKernel(func.raw, g, 1, 1, b, 1, 1, 0, stream.raw(), params.as_mut_ptr(), std::ptr::null_mut())
    };
    check("hipModuleLaunchKernel", r).map_err(|e| match e {
        Error::Hip { code, .. } => Error::Hip { op, code },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::hip::device::select_arch;
    use crate::runtime::hip::{rocm_device_count, ARCHS};

    #[test]
    fn aligned_copies_keep_every_byte_in_order() {
        for len in [0usize, 1, 7, 8, 9, 64, 4097] {
            let bin: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let words = aligned_copy(&bin);
            assert_eq!(words.len(), len.div_ceil(8));
            assert_eq!(words.as_ptr() as usize % 8, 0);
            let back: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).take(len).collect();
            assert_eq!(back, bin, "{len} bytes");
            assert!(words.iter().flat_map(|w| w.to_ne_bytes()).skip(len).all(|b| b == 0));
        }
    }

    #[test]
    fn launch_sizes_must_be_positive_and_fit_hip() {
        assert_eq!(launch_dims("k", 64, 512).unwrap(), (64, 512));
        assert_eq!(launch_dims("k", u32::MAX as usize, 1).unwrap(), (u32::MAX, 1));
        for (grid, block) in [(0, 512), (64, 0), (u32::MAX as usize + 1, 512), (1, usize::MAX)] {
            assert!(
                matches!(launch_dims("k", grid, block), Err(Error::InvalidArgument { op: "k", .. })),
                "{grid} x {block}"
            );
        }
    }

    /// A world size without a code object is Unsupported before HIP is asked; with one, a
    /// machine without an AMD GPU is Unsupported at the load.
    #[test]
    fn loading_without_a_code_object_or_an_amd_gpu_is_unsupported() {
        for (arch, _) in ARCHS {
            let dev = HipDevice::assumed(0, select_arch(arch).unwrap());
            match HipModule::load(&dev, "custom_allreduce", crate::runtime::protocol::MAX_RANKS + 1) {
                Err(Error::Unsupported { what, .. }) => assert!(what.contains(arch), "{what}"),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a module without a code object"),
            }
            if rocm_device_count().is_err() {
                match HipModule::load(&dev, "custom_allreduce", 2) {
                    Err(Error::Unsupported { what, .. }) => assert!(what.contains("hipSetDevice"), "{what}"),
                    Err(e) => panic!("{e}"),
                    Ok(_) => panic!("a module without an AMD GPU"),
                }
            }
        }
    }
}
