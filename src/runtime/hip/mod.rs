//! The HIP runtime of ROCm, through `hip-runtime-sys` (Cargo feature `rocm`, off by default).
//!
//! **None of this has run on AMD hardware.** Every file here is built and its pure logic tested
//! on machines without an AMD GPU (where each constructor that needs a device returns
//! [`Error::Unsupported`]); no allocation, launch, IPC mapping or RCCL call has been made on a
//! real GPU. No backend uses this module yet: with the feature on, the backends and the
//! `Communicator` still run on CUDA only.
//!
//! The layering is cudarc's: `hip-runtime-sys` is the raw layer, [`check`] turns each raw
//! status into a typed error naming the call, and small owning types above it free what they
//! own on drop. The names follow the CUDA side (`src/runtime/`), so that a later change can
//! alias the types per vendor:
//!
//! - this file: the device probe [`rocm_device_count`], the embedded code objects for gfx90a
//!   and gfx942 (compiled by `build.rs` from the CUDA sources; `kernels/portable.cuh` holds what
//!   differs) with their ELF check, and the status mapping;
//! - [`device`]: [`device::HipDevice`], an opened GPU with its properties and the architecture
//!   whose code objects it loads;
//! - [`stream`]: [`stream::HipStream`] (create, synchronize, capture) and
//!   [`stream::HipGraph`] (a captured graph, instantiated, launched);
//! - [`module`]: [`module::HipModule`] (`hipModuleLoadData` of an embedded code object) and
//!   [`module::launch`] over `hipModuleLaunchKernel`;
//! - [`ipc`]: [`ipc::IpcBuffer`] (device or uncached memory peers can map) and
//!   [`ipc::PeerMappings`] (peers' buffers opened here);
//! - [`host_word`]: [`host_word::HostWord`], the mapped error word;
//! - [`rccl`]: RCCL, loaded at run time like libnccl.
//!
//! `hip-runtime-sys` (bindings of HIP 5.4) links `libamdhip64` when the crate is built:
//! Debian's `libamdhip64-dev` (HIP 5.2) serves with `HIP_PATH=/usr`. Without an AMD GPU that
//! runtime answers `hipErrorNoDevice` to `hipGetDeviceCount` and `hipErrorInvalidDevice` to the
//! calls that need a device (measured with Debian's HIP 5.2).

// No backend runs on HIP yet: the items below are used by their tests only.
#[allow(dead_code)]
pub(crate) mod device;
#[allow(dead_code)]
pub(crate) mod host_word;
#[allow(dead_code)]
pub(crate) mod ipc;
#[allow(dead_code)]
pub(crate) mod module;
#[allow(dead_code)]
pub(crate) mod rccl;
#[allow(dead_code)]
pub(crate) mod stream;

use crate::error::{Error, Result};
use hip_runtime_sys::{hipError_t, hipGetDeviceCount};

include!(concat!(env!("OUT_DIR"), "/hip_code_objects.rs"));

/// The AMD architectures the code objects are built for, with the `e_flags` machine number
/// (`EF_AMDGPU_MACH_*`, the low byte) their ELF headers carry: MI200 and MI300.
#[cfg_attr(not(test), allow(dead_code))] // picked per device by `device`, which no backend uses yet
pub(crate) const ARCHS: [(&str, u32); 2] = [("gfx90a", 0x3f), ("gfx942", 0x4c)];

/// The code object of kernel family `family` for `world` ranks and the AMD architecture `arch`,
/// for `hipModuleLoadData`.
#[cfg_attr(not(test), allow(dead_code))] // loaded by `module`, which no backend uses yet
pub(crate) fn code_object(family: &str, world: usize, arch: &str) -> Option<&'static [u8]> {
    CODE_OBJECTS.iter().find(|(f, w, a, _)| *f == family && *w == world && *a == arch).map(|&(_, _, _, bin)| bin)
}

/// Whether `bin` is an AMDGPU code object for machine `mach`: a 64-bit ELF for `EM_AMDGPU`
/// whose `e_flags` low byte is `mach`.
#[cfg_attr(not(test), allow(dead_code))] // checked before loading, by `module`
pub(crate) fn check_amdgpu_object(bin: &[u8], mach: u32) -> Result<()> {
    const EM_AMDGPU: u16 = 224;
    let bad = |what: String| Err(Error::Internal(format!("not an AMDGPU code object for mach {mach:#x}: {what}")));
    if bin.len() < 64 || !bin.starts_with(b"\x7fELF") || bin[4] != 2 {
        return bad("not a 64-bit ELF".into());
    }
    let machine = u16::from_le_bytes([bin[18], bin[19]]);
    let flags = u32::from_le_bytes([bin[48], bin[49], bin[50], bin[51]]);
    if machine != EM_AMDGPU {
        return bad(format!("e_machine {machine}"));
    }
    if flags & 0xff != mach {
        return bad(format!("e_flags {flags:#x}"));
    }
    Ok(())
}

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

/// What a ROCm build answers where the application asks for device memory: the device layer's
/// backends run on CUDA only so far, so a build for ROCm serves host memory and refuses device
/// calls with a typed error instead of reaching for a CUDA driver. `local_rank` picks the GPU
/// (`local_rank % visible GPUs`) when `ordinal` is `None`, as on CUDA.
///
/// # Errors
/// Always [`Error::Unsupported`]: the probe's answer where no AMD GPU is usable (no device, no
/// runtime), else the opened GPU named with what is missing.
pub(crate) fn device_layer_unsupported(ordinal: Option<usize>, local_rank: usize) -> Error {
    let ordinal = match (ordinal, rocm_device_count()) {
        (_, Err(e)) => return e,
        (Some(o), Ok(_)) => o,
        (None, Ok(n)) => local_rank % n,
    };
    match device::HipDevice::open(ordinal) {
        Err(e) => e,
        Ok(dev) => Error::Unsupported {
            what: "allreduce of device memory in a ROCm build".into(),
            reason: format!(
                "found {} ({}), but tpcomm's device backends do not run on HIP yet (the HIP runtime module and the \
                 kernels' code objects exist; no backend uses them): use host memory, or a build without the rocm \
                 feature on NVIDIA GPUs",
                dev.name(),
                dev.arch_name()
            ),
        },
    }
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

/// The error a failed HIP call (`status` other than `hipSuccess`) becomes, naming the call `op`.
///
/// Statuses that mean no AMD GPU can be used in this process (`hipErrorNoDevice`,
/// `hipErrorInvalidDevice`, `hipErrorInsufficientDriver`: what HIP answers on a machine
/// without one) and that this GPU or runtime cannot run the request (`hipErrorNoBinaryForGpu`,
/// `hipErrorNotSupported`) are [`Error::Unsupported`]; every other status is [`Error::Hip`].
/// [`device::HipDevice::open`] checks the ordinal first, so `hipErrorInvalidDevice` later does
/// not stand for a wrong ordinal.
pub(crate) fn hip_error(op: &'static str, status: hipError_t) -> Error {
    let code = status_name(status);
    let unsupported = |why: &str| Error::Unsupported {
        what: format!("{op} (the ROCm device path)"),
        reason: format!("HIP answers {code}: {why}"),
    };
    match status {
        hipError_t::hipErrorNoDevice | hipError_t::hipErrorInvalidDevice | hipError_t::hipErrorInsufficientDriver => {
            unsupported(
                "no AMD GPU is usable in this process (check HIP_VISIBLE_DEVICES, the amdgpu driver and access to \
                 /dev/kfd), or build tpcomm without the rocm feature",
            )
        }
        hipError_t::hipErrorNoBinaryForGpu | hipError_t::hipErrorNotSupported => {
            unsupported("this GPU or HIP runtime cannot serve the call")
        }
        _ => Error::Hip { op, code },
    }
}

/// Turn a raw HIP status into `Ok` (`hipSuccess`) or the typed error of [`hip_error`].
pub(crate) fn check(op: &'static str, status: hipError_t) -> Result<()> {
    match status {
        hipError_t::hipSuccess => Ok(()),
        other => Err(hip_error(op, other)),
    }
}

/// A status as errors print it: its name and number, e.g. `hipErrorOutOfMemory (2)`.
fn status_name(status: hipError_t) -> String {
    format!("{status:?} ({})", status as u32)
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

    #[test]
    fn hip_statuses_map_to_typed_errors_naming_the_call() {
        assert!(check("hipMalloc", hipError_t::hipSuccess).is_ok());
        for status in [
            hipError_t::hipErrorNoDevice,
            hipError_t::hipErrorInvalidDevice,
            hipError_t::hipErrorInsufficientDriver,
            hipError_t::hipErrorNoBinaryForGpu,
            hipError_t::hipErrorNotSupported,
        ] {
            match check("hipStreamCreateWithFlags", status) {
                Err(Error::Unsupported { what, reason }) => {
                    assert!(what.contains("hipStreamCreateWithFlags"), "{what}");
                    assert!(reason.contains(&format!("{status:?} ({})", status as u32)), "{reason}");
                }
                other => panic!("{status:?}: {other:?}"),
            }
        }
        for (status, code) in [
            (hipError_t::hipErrorOutOfMemory, "hipErrorOutOfMemory (2)"),
            (hipError_t::hipErrorInvalidValue, "hipErrorInvalidValue (1)"),
            (hipError_t::hipErrorIllegalAddress, "hipErrorIllegalAddress (700)"),
            (hipError_t::hipErrorInvalidImage, "hipErrorInvalidImage (200)"),
        ] {
            match check("hipMalloc", status) {
                Err(e @ Error::Hip { op: "hipMalloc", .. }) => {
                    assert_eq!(e.to_string(), format!("hipMalloc: HIP error {code}"))
                }
                other => panic!("{status:?}: {other:?}"),
            }
        }
    }

    /// Every family, world size and architecture has its code object, built from exactly the
    /// sources the CUDA build compiles, for the right machine, with every entry point.
    #[test]
    fn every_kernel_has_a_code_object_for_each_amd_architecture() {
        use crate::runtime::kernels::FAMILIES;
        let built = [
            ("custom_allreduce", include_str!(concat!(env!("OUT_DIR"), "/custom_allreduce.hip"))),
            ("packet_allreduce", include_str!(concat!(env!("OUT_DIR"), "/packet_allreduce.hip"))),
            ("quick_allreduce", include_str!(concat!(env!("OUT_DIR"), "/quick_allreduce.hip"))),
            ("rms_norm", include_str!(concat!(env!("OUT_DIR"), "/rms_norm.hip"))),
        ];
        for family in FAMILIES {
            let source = built.iter().find(|(n, _)| *n == family.name).map(|(_, s)| *s);
            assert_eq!(source, Some(family.source), "build.rs compiles other files for {}", family.name);
            for world in 1..=crate::runtime::protocol::MAX_RANKS {
                for (arch, mach) in ARCHS {
                    let what = format!("{} world {world} {arch}", family.name);
                    let bin = code_object(family.name, world, arch).unwrap_or_else(|| panic!("no code object: {what}"));
                    check_amdgpu_object(bin, mach).unwrap_or_else(|e| panic!("{what}: {e}"));
                    for e in family.entries() {
                        assert!(bin.windows(e.len()).any(|w| w == e.as_bytes()), "{what}: no entry {e}");
                    }
                }
            }
        }
        assert_eq!(CODE_OBJECTS.len(), FAMILIES.len() * crate::runtime::protocol::MAX_RANKS * ARCHS.len());
    }

    /// A 64-byte ELF header with the given machine and flags.
    fn header(machine: u16, flags: u32) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[48..52].copy_from_slice(&flags.to_le_bytes());
        h
    }

    #[test]
    fn amdgpu_object_check_takes_only_the_named_architecture() {
        // gfx942 with xnack/sramecc bits above the machine byte, as clang-19 writes it.
        assert!(check_amdgpu_object(&header(224, 0x54c), 0x4c).is_ok());
        assert!(check_amdgpu_object(&header(224, 0x53f), 0x4c).is_err(), "gfx90a is not gfx942");
        assert!(check_amdgpu_object(&header(190, 0x4c), 0x4c).is_err(), "EM_CUDA is not EM_AMDGPU");
        let mut elf32 = header(224, 0x4c);
        elf32[4] = 1;
        assert!(check_amdgpu_object(&elf32, 0x4c).is_err(), "a 32-bit ELF");
        assert!(check_amdgpu_object(b"\x7fELF", 0x4c).is_err(), "truncated");
    }

    /// The device layer of a ROCm build refuses with a typed error on every machine: here,
    /// without an AMD GPU, with the probe's reason.
    #[test]
    fn the_hip_device_layer_refuses_device_memory_with_a_typed_error() {
        for ordinal in [None, Some(0), Some(3)] {
            match device_layer_unsupported(ordinal, 1) {
                Error::Unsupported { what, reason } => {
                    let no_gpu = rocm_device_count().is_err();
                    assert!(
                        !no_gpu || reason.contains("AMD GPU") || reason.contains("HIP runtime"),
                        "{what}: {reason}"
                    );
                    assert!(no_gpu || reason.contains("do not run on HIP yet") || what.contains("ROCm"), "{reason}");
                }
                other => panic!("{ordinal:?}: {other}"),
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
