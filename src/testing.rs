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

/// What ptxas reports for one kernel entry: registers per thread and local memory (stack frame
/// and spills, bytes). A row of a rank-data table indexed at run time, or too small a register
/// budget, shows up here as stack or spills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    pub family: String,
    pub world: usize,
    pub entry: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Compile `family` (every family when `None`) for each world size in `worlds` for `sm_{arch}`
/// with `--ptxas-options=-v`, and read every entry's resources from the log.
///
/// # Errors
/// [`crate::Error::InvalidArgument`] for an unknown family; [`crate::Error::Compile`] from NVRTC;
/// [`crate::Error::Internal`] when an entry's report cannot be read from the log.
#[cfg(not(feature = "rocm"))]
pub fn kernel_resources(arch: (i32, i32), family: Option<&str>, worlds: &[usize]) -> Result<Vec<KernelResources>> {
    use crate::runtime::cuda::module_cache;
    use crate::runtime::kernels;
    let families: Vec<_> = kernels::FAMILIES.iter().filter(|f| family.is_none_or(|name| f.name == name)).collect();
    if families.is_empty() {
        let names: Vec<&str> = kernels::FAMILIES.iter().map(|f| f.name).collect();
        return Err(crate::Error::invalid("kernel_resources", format!("no family {family:?}; one of {names:?}")));
    }
    let mut out = Vec::new();
    for f in families {
        for &world in worlds {
            let mut opts = (f.defines)(world);
            opts.push("--ptxas-options=-v".into());
            let (_, log) = module_cache::compile_with_log(f.name, f.source, &opts, arch)?;
            let found = parse_ptxas_log(&log, f.name, world)?;
            if let Some(e) = f.entries().into_iter().find(|e| !found.iter().any(|k| &k.entry == e)) {
                return Err(crate::Error::Internal(format!(
                    "ptxas reported nothing for {e} ({}, world {world})",
                    f.name
                )));
            }
            out.extend(found);
        }
    }
    Ok(out)
}

/// The entries of one ptxas `-v` log: "Compiling entry function 'E'" opens an entry, "N bytes
/// stack frame, S bytes spill stores, L bytes spill loads" (after "Function properties for E")
/// and "Used R registers" describe it.
#[cfg(not(feature = "rocm"))]
fn parse_ptxas_log(log: &str, family: &str, world: usize) -> Result<Vec<KernelResources>> {
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let head = &line[..line.find(unit)?];
        head.split(|c: char| !c.is_ascii_digit()).rfind(|w| !w.is_empty())?.parse().ok()
    };
    let mut out: Vec<KernelResources> = Vec::new();
    // "Function properties for F" precedes F's stack line; F may be a non-inlined device function.
    let mut props_of_entry = false;
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            props_of_entry = out.last().is_some_and(|k| k.entry == rest.trim());
            continue;
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let entry = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources {
                family: family.to_string(),
                world,
                entry,
                registers: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") && props_of_entry {
            cur.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            cur.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            cur.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("registers") {
            cur.registers = number_before(line, "registers").unwrap_or(0);
        }
    }
    match out.iter().find(|k| k.registers == 0) {
        Some(k) => Err(crate::Error::Internal(format!(
            "ptxas reported no registers for {} ({family}, world {world})",
            k.entry
        ))),
        None => Ok(out),
    }
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
