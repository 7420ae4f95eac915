//! The HIP runtime of ROCm, through `hip-runtime-sys` (Cargo feature `rocm`, off by default).
//!
//! Built so far: the device probe, which turns "no AMD GPU here" into a typed
//! [`Error::Unsupported`] instead of a panic or an `Ok`. Not built yet: IPC buffers
//! (`hipIpcGetMemHandle` / `hipIpcOpenMemHandle`, uncached signal memory through
//! `hipExtMallocWithFlags` with `hipDeviceMallocUncached` = 3, which HIP 5.x bindings lack),
//! streams, graphs, module loading of the kernels' code objects and RCCL. The kernels themselves
//! are the CUDA sources, compiled for gfx90a and gfx942 by the compile tests
//! (`kernels/portable.cuh`); none has run on AMD hardware.
//!
//! `hip-runtime-sys` links `libamdhip64` when the crate is built: Debian's `libamdhip64-dev`
//! (HIP 5.2) serves with `HIP_PATH=/usr`.

use crate::error::{Error, Result};
use hip_runtime_sys::{hipError_t, hipGetDeviceCount};

/// The number of AMD GPUs HIP can run kernels on in this process (`hipGetDeviceCount`).
///
/// # Errors
/// [`Error::Unsupported`] where HIP finds no AMD GPU, or where the HIP runtime cannot start
/// (the reason names HIP's answer and what to check).
pub fn rocm_device_count() -> Result<usize> {
    let mut count: i32 = 0;
    // SAFETY: hipGetDeviceCount writes one int through a valid, exclusive pointer.
    let status = unsafe { hipGetDeviceCount(&mut count) };
    count_or_unsupported(status, count)
}

/// The probe's answer as tpcomm reports it.
fn count_or_unsupported(status: hipError_t, count: i32) -> Result<usize> {
    let what = || "the ROCm (HIP) device path".to_string();
    match status {
        hipError_t::hipSuccess if count > 0 => Ok(count as usize),
        hipError_t::hipSuccess | hipError_t::hipErrorNoDevice => Err(Error::Unsupported {
            what: what(),
            reason: "hipGetDeviceCount finds no AMD GPU in this process (check HIP_VISIBLE_DEVICES, the amdgpu driver \
                     and access to /dev/kfd), or build tpcomm without the rocm feature"
                .into(),
        }),
        other => Err(Error::Unsupported {
            what: what(),
            reason: format!(
                "the HIP runtime did not start (hipGetDeviceCount: {other:?}); check the ROCm installation, \
                 HIP_VISIBLE_DEVICES and access to /dev/kfd"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hip_answers_map_to_counts_or_typed_errors() {
        assert_eq!(count_or_unsupported(hipError_t::hipSuccess, 2).unwrap(), 2);
        for (status, count, says) in [
            (hipError_t::hipErrorNoDevice, 0, "no AMD GPU"),
            (hipError_t::hipSuccess, 0, "no AMD GPU"),
            (hipError_t::hipErrorInvalidValue, 0, "hipErrorInvalidValue"),
        ] {
            match count_or_unsupported(status, count) {
                Err(Error::Unsupported { what, reason }) => {
                    assert!(what.contains("ROCm") && reason.contains(says), "{what}: {reason}")
                }
                other => panic!("{status:?}: {other:?}"),
            }
        }
    }

    /// The real runtime: a machine without an AMD GPU (every CI machine) gets the typed error,
    /// and nothing panics.
    #[test]
    fn the_probe_without_an_amd_gpu_is_unsupported() {
        match rocm_device_count() {
            Ok(n) => assert!(std::env::var_os("CI").is_none() && n > 0, "{n} AMD GPUs under CI?"),
            Err(e) => assert!(matches!(e, Error::Unsupported { .. }), "{e}"),
        }
    }
}
