//! Test support that reaches inside the crate: host calls on the CPU stand-in of the device
//! backends, and the kernel compile checks. Not part of the API (hidden from the docs); the
//! project's own tests use it.

use crate::{CallOptions, Communicator, Element, Result};

/// A device call on the CPU stand-in (a communicator built with `mock_device()`): `input` and
/// `output` are host memory, and the call runs through the real plan and device layer, with
/// every backend replaced by an exact rank-order sum over MPI.
///
/// # Safety
/// `input` and `output` are valid for `len` elements of `T` (they may be the same memory).
///
/// # Collective
/// As [`Communicator::all_reduce_with`].
///
/// # Errors
/// As [`Communicator::all_reduce_with`].
pub unsafe fn mock_all_reduce<T: Element>(
    comm: &Communicator,
    opts: &CallOptions,
    input: *const T,
    output: *mut T,
    len: usize,
) -> Result<()> {
    // SAFETY: the caller's contract; the stand-in reads and writes host memory.
    unsafe { comm.device_call(opts, input as u64, output as u64, len, T::DTYPE, crate::runtime::StreamRef::Host, None) }
}

/// [`Communicator::all_reduce_add_rms_norm_with`] on the CPU stand-in: every buffer is host
/// memory (`norm_out` may be `input`, `residual_out` may be `residual`), and the call runs
/// through the real checks, plan and device layer.
///
/// # Safety
/// Every pointer is valid for `len` elements of `T` (`weight`: `hidden`).
///
/// # Collective
/// As [`Communicator::all_reduce_add_rms_norm`].
///
/// # Errors
/// As [`Communicator::all_reduce_add_rms_norm_with`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn mock_all_reduce_add_rms_norm<T: Element>(
    comm: &Communicator,
    opts: &CallOptions,
    input: *const T,
    residual: *const T,
    weight: *const T,
    hidden: usize,
    eps: f32,
    norm_out: *mut T,
    residual_out: *mut T,
    len: usize,
) -> Result<()> {
    let bufs = crate::norm::NormBuffers {
        input: (input as u64, len),
        residual: (residual as u64, len),
        weight: (weight as u64, hidden),
        norm_out: (norm_out as u64, len),
        residual_out: (residual_out as u64, len),
    };
    // SAFETY: the caller's contract; the stand-in reads and writes host memory.
    unsafe { comm.norm_call(opts, &bufs, eps, T::DTYPE, crate::runtime::StreamRef::Host) }
}

/// Whether an NVRTC library can be loaded (the kernel compile checks need one).
#[cfg(not(feature = "rocm"))]
pub fn nvrtc_present() -> bool {
    crate::runtime::cuda::module_cache::nvrtc_present()
}

/// NVRTC's version.
///
/// # Errors
/// When NVRTC cannot be queried.
#[cfg(not(feature = "rocm"))]
pub fn nvrtc_version() -> Result<(i32, i32)> {
    crate::runtime::cuda::module_cache::nvrtc_version()
}

/// Compile every kernel family for every world size `1..=8` for `sm_{arch}`: one entry per
/// (family, world) with the CUBIN's size or the compile error, and the entry points a CUBIN
/// lacks.
#[cfg(not(feature = "rocm"))]
pub fn compile_every_kernel(arch: (i32, i32)) -> Vec<(String, usize, Result<usize>)> {
    use crate::runtime::cuda::module_cache;
    use crate::runtime::{kernels, protocol};
    let mut out = Vec::new();
    for family in kernels::FAMILIES {
        for world in 1..=protocol::MAX_RANKS {
            let r = module_cache::compile_cubin(family.name, family.source, &(family.defines)(world), arch).and_then(
                |bin| {
                    let missing: Vec<String> = family
                        .entries()
                        .into_iter()
                        .filter(|e| !bin.windows(e.len()).any(|w| w == e.as_bytes()))
                        .collect();
                    if !bin.starts_with(b"\x7fELF") || !missing.is_empty() {
                        return Err(crate::Error::Internal(format!("not a complete CUBIN (missing {missing:?})")));
                    }
                    Ok(bin.len())
                },
            );
            out.push((family.name.to_string(), world, r));
        }
    }
    out
}

/// Compile the custom family without its protocol defines (must fail, naming them).
#[cfg(not(feature = "rocm"))]
pub fn compile_without_defines() -> Result<usize> {
    let f = &crate::runtime::kernels::CUSTOM;
    crate::runtime::cuda::module_cache::compile_cubin(f.name, f.source, &[], (9, 0)).map(|b| b.len())
}

/// The bounded byte all-gather every set-up exchange uses (30 s limit).
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`crate::Error::PeerTimeout`].
pub fn all_gather_bytes<C: mpi::traits::Communicator>(comm: &C, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    crate::exchange::all_gather_bytes(comm, mine, std::time::Duration::from_secs(30), "test")
}

/// The bounded byte broadcast every set-up exchange uses (30 s limit).
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`crate::Error::PeerTimeout`].
pub fn broadcast_bytes<C: mpi::traits::Communicator>(comm: &C, root: usize, blob: &mut Vec<u8>) -> Result<()> {
    crate::exchange::broadcast_bytes(comm, root, blob, std::time::Duration::from_secs(30), "test")
}

/// A bounded barrier of `timeout`.
///
/// # Collective
/// Every rank of `comm`.
///
/// # Errors
/// [`crate::Error::PeerTimeout`].
pub fn barrier<C: mpi::traits::Communicator>(comm: &C, timeout: std::time::Duration) -> Result<()> {
    crate::exchange::barrier(comm, timeout, "test barrier")
}
