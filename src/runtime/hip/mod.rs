//! The HIP runtime of ROCm, through `hip-runtime-sys` (Cargo feature `rocm`, off by default):
//! the side of the runtime facade a ROCm build runs on.
//!
//! **None of this has run on AMD hardware.** Every file here is built, and its pure logic tested,
//! on machines without an AMD GPU (where each constructor that needs a device returns
//! [`Error::Unsupported`]); no allocation, launch, IPC mapping or RCCL call has been made on a
//! real GPU. With the feature on, `runtime/mod.rs` re-exports this module's items under the
//! facade's names, so the same backends (custom, packet, quick), the device layer and the
//! `Communicator` are built on HIP, and the public `tpcomm::Context`, `Stream`, `Graph` and
//! device-pointer traits are the types below.
//!
//! The layering is cudarc's: `hip-runtime-sys` is the raw layer, [`check`] turns each raw
//! status into a typed error naming the call, and small owning types above it free what they
//! own on drop. The names follow the CUDA side (`src/runtime/cuda/`):
//!
//! - this file: the device probe [`rocm_device_count`], the embedded code objects for gfx90a
//!   and gfx942 (compiled by `build.rs` from the CUDA sources; `kernels/portable.cuh` holds what
//!   differs) with their ELF check, the status mapping, and the facade's functions (launch,
//!   occupancy, module loading, stream and capture helpers);
//! - [`device`]: [`device::HipDevice`] (`Context`), an opened GPU with its properties and the
//!   architecture whose code objects it loads, and the topology's device queries;
//! - [`stream`]: [`stream::HipStream`] (`Stream`: create, synchronize, capture) and
//!   [`stream::HipGraph`] (`Graph`: a captured graph, instantiated, replayed on its stream);
//! - [`module`]: [`module::HipModule`] (`hipModuleLoadData` of an embedded code object),
//!   [`module::HipFunction`] (`Function`) and [`module::launch`] over `hipModuleLaunchKernel`;
//! - [`buffer`]: the public device-pointer traits, views, [`buffer::HipSlice`] and the memory
//!   behind a `DeviceBuffer`;
//! - [`ipc`]: [`ipc::IpcBuffer`] (device or uncached memory peers can map) and
//!   [`ipc::PeerMappings`] (peers' buffers opened here);
//! - [`host_word`]: [`host_word::HostWord`], the mapped error word, and
//!   [`host_word::MappedHostPage`], the registered fault page;
//! - [`rccl`]: RCCL, loaded at run time like libnccl (the NCCL slot's backend in a ROCm build).
//!
//! Where the vendors differ, this side decides: there is no programmatic dependent launch (the
//! `pdl` flag of [`launch`] is ignored: kernels of one stream run one after the other); the
//! kernels come from the embedded code objects, never compiled at run time (the kernel cache
//! directory is unused); occupancy is `hipModuleOccupancyMaxActiveBlocksPerMultiprocessor` per
//! compute unit; and a wavefront has [`WAVE`] = 64 lanes on gfx90a and gfx942 (clang's default
//! for them, which `build.rs` keeps), so the packet kernels' data threads come in whole
//! wavefronts (`backend/packet.rs`).
//!
//! `hip-runtime-sys` (bindings of HIP 5.4) links `libamdhip64` when the crate is built:
//! Debian's `libamdhip64-dev` (HIP 5.2) serves with `HIP_PATH=/usr`. Without an AMD GPU that
//! runtime answers `hipErrorNoDevice` to `hipGetDeviceCount` and `hipErrorInvalidDevice` to the
//! calls that need a device (measured with Debian's HIP 5.2).

pub(crate) mod buffer;
pub(crate) mod device;
pub(crate) mod host_word;
pub(crate) mod ipc;
pub(crate) mod module;
pub(crate) mod rccl;
pub(crate) mod stream;

use crate::error::{Error, Result};
use crate::runtime::kernels::Family;
use hip_runtime_sys::{hipError_t, hipGetDeviceCount, hipMemcpyDtoDAsync, hipMemsetD8Async, hipStreamCaptureMode};
use std::sync::Arc;

pub(crate) use buffer::DeviceMemory;
pub use buffer::{DevicePtr, DevicePtrMut, DeviceSlice};
pub(crate) use device::{
    bind, device_count, device_name, identity, native_atomics, open, ordinal, p2p_access, pci_bus_id,
};
pub(crate) use host_word::{HostWord, MappedHostPage};

/// The GPU a communicator runs on (`tpcomm::Context` in a ROCm build).
pub type Context = device::HipDevice;
/// A stream of the GPU (`tpcomm::Stream` in a ROCm build).
pub type Stream = stream::HipStream;
/// A captured, instantiated graph (`tpcomm::Graph` in a ROCm build).
pub type Graph = stream::HipGraph;
/// A kernel of a loaded code object.
pub(crate) type Function = module::HipFunction;
/// A loaded kernel family.
pub(crate) type Module = Arc<module::HipModule>;

/// Lanes of a wavefront on the AMD GPUs tpcomm builds for (gfx90a, gfx942: wave64).
pub const WAVE: usize = 64;

/// `e` with `op` as the call it names, when it is a HIP error (the facade's callers name the
/// step, as on CUDA).
fn named(op: &'static str) -> impl FnOnce(Error) -> Error {
    move |e| match e {
        Error::Hip { code, .. } => Error::Hip { op, code },
        other => other,
    }
}

/// Wait for all work of the device (`hipDeviceSynchronize`); `op` names the step in the error.
///
/// # Errors
/// [`Error::Hip`] naming `op` when work on the device failed.
pub(crate) fn synchronize(device: &Context, op: &'static str) -> Result<()> {
    device.synchronize().map_err(named(op))
}

/// A number that tells streams apart (the raw handle's address).
pub(crate) fn stream_id(stream: &Stream) -> usize {
    stream.raw() as usize
}

/// Whether all work enqueued on `stream` so far has finished (`hipStreamQuery`), without
/// waiting.
///
/// # Errors
/// [`Error::Hip`] naming `op` when the stream holds a failed operation.
pub(crate) fn stream_done(stream: &Stream, op: &'static str) -> Result<bool> {
    stream.query().map_err(named(op))
}

/// Whether `stream` is capturing a graph now.
///
/// # Errors
/// [`Error::Hip`] when HIP cannot tell.
pub(crate) fn is_capturing(stream: &Stream) -> Result<bool> {
    Ok(stream.capture_status()? == stream::CaptureStatus::Active)
}

/// Enqueue a copy of `bytes` from `src` to `dst` on `stream` (`hipMemcpyDtoDAsync`).
///
/// # Safety
/// Both ranges are device memory of the stream's device for `bytes` bytes, not written by other
/// work until the copy ran.
pub(crate) unsafe fn copy_async(stream: &Stream, dst: u64, src: u64, bytes: usize) -> Result<()> {
    stream.device().bind()?;
    // SAFETY: the caller's contract; the stream is live for the borrow.
    check("hipMemcpyDtoDAsync", unsafe {
        hipMemcpyDtoDAsync(dst as *mut std::ffi::c_void, src as *mut std::ffi::c_void, bytes, stream.raw())
    })
}

/// Enqueue zero-filling `bytes` at `dst` on `stream` (`hipMemsetD8Async`).
///
/// # Safety
/// As [`copy_async`] for the destination.
pub(crate) unsafe fn zero_async(stream: &Stream, dst: u64, bytes: usize) -> Result<()> {
    stream.device().bind()?;
    // SAFETY: the caller's contract.
    check("hipMemsetD8Async", unsafe { hipMemsetD8Async(dst as *mut std::ffi::c_void, 0, bytes, stream.raw()) })
}

/// Start capturing `stream` into a graph, in relaxed mode.
///
/// # Errors
/// [`Error::Hip`], for example when the stream captures already.
pub(crate) fn begin_capture(stream: &Stream) -> Result<()> {
    stream.begin_capture(hipStreamCaptureMode::hipStreamCaptureModeRelaxed)
}

/// End the capture of `stream` and instantiate what was recorded.
///
/// # Errors
/// [`Error::Hip`] when the capture failed or cannot be instantiated.
pub(crate) fn end_capture(stream: &Arc<Stream>) -> Result<Option<Graph>> {
    stream.end_capture().map(Some)
}

/// Replay `graph` on the stream it was captured on.
///
/// # Errors
/// [`Error::Hip`] when the launch fails.
pub(crate) fn launch_graph(graph: &Graph) -> Result<()> {
    graph.launch()
}

/// Launch `func` on `stream` with `grid` blocks of `block` threads ([`module::launch`]). HIP has
/// no programmatic dependent launch: `pdl` is ignored, and a kernel starts once the previous one
/// of its stream ended.
///
/// # Safety
/// As [`module::launch`].
///
/// # Errors
/// As [`module::launch`].
pub(crate) unsafe fn launch(
    func: &Function,
    grid: usize,
    block: usize,
    stream: &Stream,
    params: &mut [*mut std::ffi::c_void],
    _pdl: bool,
    op: &'static str,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { module::launch(func, grid, block, stream, params, op) }
}

/// Most blocks one launch of any of `funcs` (at `threads` per block) may have so that the blocks
/// of all `ranks_per_device` ranks sharing the GPU are resident at once: per compute unit as
/// HIP's occupancy calculator says, times the compute units.
///
/// # Errors
/// [`Error::Unsupported`] when the GPU cannot hold one block per rank; [`Error::Hip`].
pub(crate) fn co_resident_blocks<'a>(
    device: &Context,
    funcs: impl Iterator<Item = &'a Function>,
    threads: usize,
    ranks_per_device: usize,
    what: &str,
) -> Result<usize> {
    let mut per_cu = usize::MAX;
    for f in funcs {
        per_cu = per_cu.min(f.max_active_blocks_per_cu(threads)?);
    }
    super::resident_cap(per_cu, device.multiprocessor_count(), threads, ranks_per_device, what)
}

/// The embedded code object of `family` for `world` ranks and the device's architecture, loaded
/// (nothing is compiled at run time: `cache_dir` is unused, and the answer is never "from the
/// disk cache"). `what` names the backend in errors.
///
/// # Errors
/// As [`module::HipModule::load`]: [`Error::Unsupported`] for a world size without code
/// objects or where HIP can use no AMD GPU, named after `what`; [`Error::Hip`].
pub(crate) fn load_module(
    device: &Arc<Context>,
    family: &Family,
    world: usize,
    _cache_dir: Option<std::path::PathBuf>,
    what: &str,
) -> Result<(Module, bool)> {
    let module = module::HipModule::load(device, family.name, world).map_err(|e| match e {
        Error::Unsupported { what: w, reason } => Error::Unsupported { what: format!("{what}: {w}"), reason },
        other => other,
    })?;
    Ok((module, false))
}

/// The kernel `name` of `module`.
///
/// # Errors
/// [`Error::Internal`] when the code object has no such kernel; [`Error::Hip`].
pub(crate) fn function(module: &Module, name: &str) -> Result<Function> {
    module.function(name)
}

include!(concat!(env!("OUT_DIR"), "/hip_code_objects.rs"));

/// The AMD architectures the code objects are built for, with the `e_flags` machine number
/// (`EF_AMDGPU_MACH_*`, the low byte) their ELF headers carry: MI200 and MI300.
pub(crate) const ARCHS: [(&str, u32); 2] = [("gfx90a", 0x3f), ("gfx942", 0x4c)];

/// The code object of kernel family `family` for `world` ranks and the AMD architecture `arch`,
/// for `hipModuleLoadData`.
pub(crate) fn code_object(family: &str, world: usize, arch: &str) -> Option<&'static [u8]> {
    CODE_OBJECTS.iter().find(|(f, w, a, _)| *f == family && *w == world && *a == arch).map(|&(_, _, _, bin)| bin)
}

/// Whether `bin` is an AMDGPU code object for machine `mach`: a 64-bit ELF of HSA code object
/// v5 for `EM_AMDGPU` whose `e_flags` low byte is `mach`.
pub(crate) fn check_amdgpu_object(bin: &[u8], mach: u32) -> Result<()> {
    const ELFOSABI_AMDGPU_HSA: u8 = 64;
    // clang-19's default; ROCm 6 runtimes load it, a ROCm 5 runtime may not (README, ROCm).
    const CODE_OBJECT_V5: u8 = 3;
    const EM_AMDGPU: u16 = 224;
    let bad = |what: String| Err(Error::Internal(format!("not an AMDGPU code object for mach {mach:#x}: {what}")));
    if bin.len() < 64 || !bin.starts_with(b"\x7fELF") || bin[4] != 2 {
        return bad("not a 64-bit ELF".into());
    }
    // EI_OSABI / EI_ABIVERSION: the HSA code object version the runtime must load.
    if (bin[7], bin[8]) != (ELFOSABI_AMDGPU_HSA, CODE_OBJECT_V5) {
        return bad(format!("EI_OSABI {} EI_ABIVERSION {} (tpcomm embeds HSA code object v5)", bin[7], bin[8]));
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
        h[7] = 64; // ELFOSABI_AMDGPU_HSA
        h[8] = 3; // code object v5
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
        let mut v4 = header(224, 0x4c);
        v4[8] = 2;
        assert!(check_amdgpu_object(&v4, 0x4c).is_err(), "code object v4");
    }

    /// The facade's module loading picks the code object by family, world size and the
    /// device's architecture: a world size without one is Unsupported before HIP is asked, and
    /// without an AMD GPU a real one is Unsupported at the load, both named after the backend.
    #[test]
    fn hip_module_loading_names_the_backend_and_what_is_missing() {
        use crate::runtime::kernels::FAMILIES;
        for (arch, _) in ARCHS {
            let dev = device::HipDevice::assumed(0, device::select_arch(arch).unwrap());
            for family in FAMILIES {
                let too_many = crate::runtime::protocol::MAX_RANKS + 1;
                match load_module(&dev, family, too_many, None, "the test backend") {
                    Err(Error::Unsupported { what, reason }) => {
                        assert!(what.starts_with("the test backend: ") && what.contains(arch), "{what}");
                        assert!(what.contains(family.name) && reason.contains("no code object"), "{what}: {reason}");
                    }
                    Err(e) => panic!("{e}"),
                    Ok(_) => panic!("a module without a code object"),
                }
                if rocm_device_count().is_err() {
                    match load_module(&dev, family, 2, None, "the test backend") {
                        Err(Error::Unsupported { what, .. }) => {
                            assert!(what.starts_with("the test backend: ") && what.contains("hipSetDevice"), "{what}")
                        }
                        Err(e) => panic!("{e}"),
                        Ok(_) => panic!("a module without an AMD GPU"),
                    }
                }
            }
        }
    }

    #[test]
    fn hip_errors_take_the_name_of_the_step() {
        let e = named("synchronize (finalize)")(Error::Hip { op: "hipDeviceSynchronize", code: "x (1)".into() });
        assert!(matches!(e, Error::Hip { op: "synchronize (finalize)", .. }), "{e}");
        let u = named("x")(Error::Unsupported { what: "w".into(), reason: "r".into() });
        assert!(matches!(u, Error::Unsupported { .. }), "{u}");
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
