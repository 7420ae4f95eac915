//! Kernels compiled at run time by NVRTC, cached in memory and on disk.
//!
//! Kernels are compiled to **CUBIN for the device's exact architecture** (`sm_XY`), not PTX: an
//! NVRTC newer than the driver may emit PTX the driver cannot JIT, while a CUBIN needs no JIT at
//! all. The CUBIN is stored under the cache directory (`TPCOMM_CACHE_DIR`, default
//! `~/.cache/tpcomm`) in a file named by a hash of the source, the options (defines included),
//! the architecture and the NVRTC version, so any change of either compiles afresh. Files are
//! written to a temporary name and renamed, so ranks compiling the same kernel at once never
//! read a half-written file. A cache directory that cannot be written only costs the cache.
//!
//! A failed compilation is [`Error::Compile`] carrying the options and NVRTC's whole log.

use super::cuda;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// True when an NVRTC library can be loaded in this process.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's version `(major, minor)`.
///
/// # Errors
/// [`Error::Compile`] when NVRTC cannot be queried.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: valid out pointers.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Compile { kernel: "nvrtcVersion".into(), log: format!("{e:?}") })?;
    Ok((major, minor))
}

/// Compile `src` with NVRTC to a CUBIN for `sm_{major}{minor}`.
///
/// # Errors
/// [`Error::Compile`] with the options and the log when NVRTC rejects the program.
pub fn compile_cubin(name: &str, src: &str, options: &[String], arch: (i32, i32)) -> Result<Vec<u8>> {
    compile_with_log(name, src, options, arch).map(|(bin, _)| bin)
}

/// As [`compile_cubin`], also returning NVRTC's log (with `--ptxas-options=-v` among `options`
/// it holds ptxas's resource usage of every entry).
///
/// # Errors
/// As [`compile_cubin`].
pub fn compile_with_log(name: &str, src: &str, options: &[String], arch: (i32, i32)) -> Result<(Vec<u8>, String)> {
    let fail = |what: &str, e: &dyn std::fmt::Debug, log: &str| Error::Compile {
        kernel: name.to_string(),
        log: format!("{what}: {e:?}\noptions: {}\n{log}", options.join(" ")),
    };
    let csrc = CString::new(src).map_err(|e| fail("source holds a NUL byte", &e, ""))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|e| fail("name holds a NUL byte", &e, ""))?;
    let prog = nvrtc::create_program(&csrc, Some(&cname)).map_err(|e| fail("nvrtcCreateProgram", &e, ""))?;
    let mut opts = options.to_vec();
    opts.push(format!("--gpu-architecture=sm_{}{}", arch.0, arch.1));
    // SAFETY: `prog` was created above and is destroyed once, at the end of this function.
    let out = unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let log = nvrtc::get_program_log(prog)
            .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(fail("nvrtcCompileProgram", &e, &log)),
            Ok(()) => {
                let mut size = 0usize;
                let r = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result();
                match r {
                    Err(e) => Err(fail("nvrtcGetCUBINSize", &e, &log)),
                    Ok(()) => {
                        let mut bin = vec![0u8; size];
                        match nvrtc_sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast()).result() {
                            Err(e) => Err(fail("nvrtcGetCUBIN", &e, &log)),
                            Ok(()) => Ok((bin, log)),
                        }
                    }
                }
            }
        }
    };
    // SAFETY: created above, not used after.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

/// 128-bit FNV-1a style hash (two 64-bit lanes with different offsets): stable across Rust
/// versions and builds, unlike `DefaultHasher`, so cache file names stay valid.
fn stable_hash(parts: &[&[u8]]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for part in parts {
        for &byte in part.iter().chain((part.len() as u64).to_le_bytes().iter()) {
            a = (a ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            b = (b ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
    }
    format!("{a:016x}{b:016x}")
}

/// The cache file name for one compilation.
pub fn cache_key(src: &str, options: &[String], arch: (i32, i32), nvrtc: (i32, i32)) -> String {
    let opts = options.join("\u{1f}");
    let arch = format!("sm_{}{}", arch.0, arch.1);
    let ver = format!("nvrtc {}.{}", nvrtc.0, nvrtc.1);
    stable_hash(&[src.as_bytes(), opts.as_bytes(), arch.as_bytes(), ver.as_bytes()])
}

/// A CUBIN from the disk cache under `dir`, or compiled (and stored) on a miss.
/// Returns the image and whether it came from the cache.
///
/// # Errors
/// As [`compile_cubin`]; problems with the cache directory are not errors.
pub fn cached_cubin(
    dir: Option<&Path>,
    name: &str,
    src: &str,
    options: &[String],
    arch: (i32, i32),
) -> Result<(Vec<u8>, bool)> {
    let key = cache_key(src, options, arch, nvrtc_version()?);
    let path = dir.map(|d| d.join(format!("{name}-sm_{}{}-{key}.cubin", arch.0, arch.1)));
    if let Some(bin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if !bin.is_empty() {
            return Ok((bin, true));
        }
    }
    let bin = compile_cubin(name, src, options, arch)?;
    if let (Some(dir), Some(path)) = (dir, path) {
        let tmp = dir.join(format!(".{name}-{key}.{}.tmp", std::process::id()));
        let stored = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &bin))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if stored.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok((bin, false))
}

/// (kernel family, options): what identifies a loaded module.
type ModuleKey = (String, Vec<String>);

/// Modules loaded into one context, by (kernel family, options).
pub struct ModuleCache {
    ctx: Arc<CudaContext>,
    dir: Option<PathBuf>,
    arch: (i32, i32),
    loaded: Mutex<HashMap<ModuleKey, Arc<CudaModule>>>,
    disk_hits: std::sync::atomic::AtomicUsize,
}

impl ModuleCache {
    /// A cache for `ctx`'s device, storing CUBINs under `dir` (`None`: memory only).
    ///
    /// # Errors
    /// [`Error::Cuda`] when the device's compute capability cannot be read.
    pub fn new(ctx: &Arc<CudaContext>, dir: Option<PathBuf>) -> Result<Self> {
        let arch = ctx.compute_capability().map_err(cuda("cuDeviceGetAttribute(compute capability)"))?;
        Ok(ModuleCache {
            ctx: ctx.clone(),
            dir,
            arch,
            loaded: Mutex::new(HashMap::new()),
            disk_hits: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Modules this cache read from disk instead of compiling.
    pub fn disk_hits(&self) -> usize {
        self.disk_hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The module of family `name` (source `src`) built with `options`, compiled or read from
    /// disk on first use.
    ///
    /// # Errors
    /// [`Error::Compile`] when compilation fails, [`Error::Cuda`] when loading fails.
    pub fn module(&self, name: &str, src: &str, options: &[String]) -> Result<Arc<CudaModule>> {
        let key = (name.to_string(), options.to_vec());
        let mut loaded = self.loaded.lock().map_err(|_| Error::Internal("module cache lock poisoned".into()))?;
        if let Some(m) = loaded.get(&key) {
            return Ok(m.clone());
        }
        let (bin, from_disk) = cached_cubin(self.dir.as_deref(), name, src, options, self.arch)?;
        if from_disk {
            self.disk_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin)).map_err(cuda("cuModuleLoadData"))?;
        loaded.insert(key, module.clone());
        Ok(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_input() {
        let o = vec!["-DA=1".to_string()];
        let k = cache_key("src", &o, (9, 0), (13, 0));
        assert_eq!(k, cache_key("src", &o, (9, 0), (13, 0)));
        assert_ne!(k, cache_key("src2", &o, (9, 0), (13, 0)));
        assert_ne!(k, cache_key("src", &["-DA=2".to_string()], (9, 0), (13, 0)));
        assert_ne!(k, cache_key("src", &o, (8, 0), (13, 0)));
        assert_ne!(k, cache_key("src", &o, (9, 0), (13, 5)));
        assert_eq!(k.len(), 32);
    }
}
