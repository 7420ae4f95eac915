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
    unsafe { comm.device_call(opts, input as u64, output as u64, len, T::DTYPE, crate::runtime::StreamRef::Host) }
}

/// Whether an NVRTC library can be loaded (the kernel compile checks need one).
pub fn nvrtc_present() -> bool {
    crate::runtime::module_cache::nvrtc_present()
}

/// NVRTC's version.
///
/// # Errors
/// When NVRTC cannot be queried.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    crate::runtime::module_cache::nvrtc_version()
}

/// Compile every kernel family for every world size `1..=8` for `sm_{arch}`: one entry per
/// (family, world) with the CUBIN's size or the compile error, and the entry points a CUBIN
/// lacks.
pub fn compile_every_kernel(arch: (i32, i32)) -> Vec<(String, usize, Result<usize>)> {
    use crate::runtime::{kernels, module_cache, protocol};
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

/// The AMD GPU architectures the HIP build of the kernels targets, with the `e_flags` machine
/// number (`EF_AMDGPU_MACH_*`, the low byte) their code objects carry: MI200 and MI300.
pub const HIP_ARCHS: [(&str, u32); 2] = [("gfx90a", 0x3f), ("gfx942", 0x4c)];

/// The clang that compiles the kernels for AMD GPUs without ROCm (`clang-19` on `PATH`, with
/// `ld.lld-19` beside it), if there is one.
pub fn hip_clang() -> Option<std::path::PathBuf> {
    let ok = |cmd: &str| {
        std::process::Command::new(cmd).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
    };
    (ok("clang-19") && ok("ld.lld-19")).then(|| "clang-19".into())
}

/// Compile every kernel family for every world size `1..=8` for the AMD architecture `gfx`
/// with `clang` (`-x hip`, header-less, device code only, linked with lld): one entry per
/// (family, world) with the code object's size, or the compile error, a wrong ELF machine or
/// architecture, or missing entry points.
pub fn compile_every_kernel_hip(clang: &std::path::Path, gfx: &str, mach: u32) -> Vec<(String, usize, Result<usize>)> {
    use crate::runtime::{kernels, protocol};
    let dir = std::env::temp_dir().join(format!("tpcomm-hip-{}", std::process::id()));
    let mut out = Vec::new();
    for family in kernels::FAMILIES {
        for world in 1..=protocol::MAX_RANKS {
            let r = compile_hip(clang, &dir, family, world, gfx).and_then(|bin| {
                check_amdgpu_object(&bin, mach)?;
                let missing: Vec<String> =
                    family.entries().into_iter().filter(|e| !bin.windows(e.len()).any(|w| w == e.as_bytes())).collect();
                match missing.is_empty() {
                    true => Ok(bin.len()),
                    false => Err(crate::Error::Internal(format!("code object lacks {missing:?}"))),
                }
            });
            out.push((family.name.to_string(), world, r));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn compile_hip(
    clang: &std::path::Path,
    dir: &std::path::Path,
    family: &crate::runtime::kernels::Family,
    world: usize,
    gfx: &str,
) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| crate::Error::Internal(format!("HIP compile of {}: {e}", family.name));
    std::fs::create_dir_all(dir).map_err(io)?;
    let src = dir.join(format!("{}_{world}.hip", family.name));
    let obj = dir.join(format!("{}_{world}_{gfx}.co", family.name));
    std::fs::write(&src, family.source).map_err(io)?;
    let run = std::process::Command::new(clang)
        .args(["-x", "hip", &format!("--offload-arch={gfx}"), "-nogpulib", "-nogpuinc", "--cuda-device-only"])
        .args(["--no-gpu-bundle-output", "-O3", "-fuse-ld=lld", "-Werror"])
        .args((family.defines)(world))
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .output()
        .map_err(io)?;
    if !run.status.success() {
        let log = String::from_utf8_lossy(&run.stderr);
        return Err(crate::Error::Compile {
            kernel: format!("{} for {gfx}, world {world}", family.name),
            log: log.into_owned(),
        });
    }
    std::fs::read(&obj).map_err(io)
}

/// An AMDGPU code object: a 64-bit ELF for `EM_AMDGPU` whose `e_flags` name `mach`.
fn check_amdgpu_object(bin: &[u8], mach: u32) -> Result<()> {
    const EM_AMDGPU: u16 = 224;
    let bad =
        |what: String| Err(crate::Error::Internal(format!("not an AMDGPU code object for mach {mach:#x}: {what}")));
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

/// Compile the custom family without its protocol defines (must fail, naming them).
pub fn compile_without_defines() -> Result<usize> {
    let f = &crate::runtime::kernels::CUSTOM;
    crate::runtime::module_cache::compile_cubin(f.name, f.source, &[], (9, 0)).map(|b| b.len())
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
