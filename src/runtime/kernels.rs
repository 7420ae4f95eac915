//! The kernel families, embedded in the library so binaries need no files, and their loading.
//!
//! One source per family serves both vendors: CUDA compiles it at run time through NVRTC
//! (`runtime/cuda/module_cache.rs`), a ROCm build embeds the code objects `build.rs` compiled
//! from it for each world size and AMD architecture. [`Family::load`] is the one call the
//! backends make either way; it returns the family's [`super::Function`]s, which they launch with
//! [`super::launch`].
//!
//! Each family is `kernels/portable.cuh` (what differs between CUDA and HIP), `kernels/common.cuh`
//! (and `kernels/barrier.cuh` for the families that synchronise whole launches), then the
//! family's own file, compiled with the family's protocol defines for one world size. Entry
//! points are named `{algorithm}_{dtype}` (`oneshot_bf16`), the one naming rule both the `.cu`
//! files and the backends follow.

use crate::dtype::DType;

/// One kernel family: a `.cu` file and the algorithms it holds. A ROCm build reads only the
/// name at run time (`build.rs` compiled the source with the defines); the other fields serve
/// its tests, which check the embedded code objects against them.
#[derive(Debug)]
#[cfg_attr(feature = "rocm", allow(dead_code))]
pub(crate) struct Family {
    /// Family name (cache file names, error messages).
    pub name: &'static str,
    /// The whole source, `portable.cuh` and `common.cuh` first.
    pub source: &'static str,
    /// Algorithm part of every entry point.
    pub algos: &'static [&'static str],
    /// The NVRTC `-D` options for a module serving `world` ranks.
    pub defines: fn(usize) -> Vec<String>,
}

/// A family's loaded functions, by (kind, dtype).
pub(crate) type Functions<K> = std::collections::HashMap<(K, DType), super::Function>;

/// The dtypes every family has kernels for.
pub(crate) const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `kernels/custom_allreduce.cu`: one-shot (also fused with residual add + RMSNorm) and two-shot
/// (through scratch, or stored directly).
pub(crate) const CUSTOM: Family = Family {
    name: "custom_allreduce",
    source: concat!(
        include_str!("../../kernels/portable.cuh"),
        include_str!("../../kernels/common.cuh"),
        include_str!("../../kernels/barrier.cuh"),
        include_str!("../../kernels/rms_norm.cuh"),
        include_str!("../../kernels/custom_allreduce.cu")
    ),
    algos: &["oneshot", "oneshot_norm", "twoshot", "twoshot_direct", "twoshot_norm"],
    defines: super::protocol::defines,
};

/// `kernels/packet_allreduce.cu`: LL packets (all-pairs and two-phase) and Lamport push.
pub(crate) const PACKET: Family = Family {
    name: "packet_allreduce",
    source: concat!(
        include_str!("../../kernels/portable.cuh"),
        include_str!("../../kernels/common.cuh"),
        include_str!("../../kernels/packet_allreduce.cu")
    ),
    algos: &["packet", "packet2", "lamport"],
    defines: super::protocol::packet_defines,
};

/// `kernels/quick_allreduce.cu`: two-shot with quantized traffic, one entry per codec.
pub(crate) const QUICK: Family = Family {
    name: "quick_allreduce",
    source: concat!(
        include_str!("../../kernels/portable.cuh"),
        include_str!("../../kernels/common.cuh"),
        include_str!("../../kernels/barrier.cuh"),
        include_str!("../../kernels/quick_allreduce.cu")
    ),
    algos: &["quick_fp8", "quick_int8", "quick_int6", "quick_int4"],
    defines: super::protocol::quick_defines,
};

/// `kernels/rms_norm.cu`: residual add + RMSNorm after an allreduce not fused with it (the
/// device layer's own kernel, local to a rank: compiled for one rank).
pub(crate) const NORM: Family = Family {
    name: "rms_norm",
    source: concat!(
        include_str!("../../kernels/portable.cuh"),
        include_str!("../../kernels/common.cuh"),
        include_str!("../../kernels/rms_norm.cuh"),
        include_str!("../../kernels/rms_norm.cu")
    ),
    algos: &["add_rms_norm"],
    defines: super::protocol::defines,
};

/// Every family, for the compile checks.
#[cfg_attr(all(feature = "rocm", not(test)), allow(dead_code))]
pub(crate) const FAMILIES: [&Family; 4] = [&CUSTOM, &PACKET, &QUICK, &NORM];

/// The entry point of `algo` for `dtype`, `None` for dtypes without kernels.
pub(crate) fn entry(algo: &str, dtype: DType) -> Option<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => return None,
    };
    Some(format!("{algo}_{suffix}"))
}

/// The error for a dtype a family has no kernel for.
pub(crate) fn unsupported_dtype(family: &str, dtype: DType) -> crate::Error {
    crate::Error::Unsupported {
        what: format!("{family} of {dtype}"),
        reason: "the kernels reduce float, half and bfloat16 (NCCL serves double where it can run)".into(),
    }
}

/// The default cache directory of compiled kernels: `$HOME/.cache/tpcomm` (or
/// `./.tpcomm-cache` without `HOME`). A ROCm build compiles nothing at run time and leaves it
/// unused.
pub fn default_cache_dir() -> std::path::PathBuf {
    std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".cache").join("tpcomm"))
        .unwrap_or_else(|| std::path::PathBuf::from(".tpcomm-cache"))
}

impl Family {
    /// Load this family for `world` ranks on `ctx`'s GPU and the functions of `kinds` (each
    /// named by `name`) for every dtype; `what` names the backend in errors. CUDA compiles the
    /// source through NVRTC for the GPU's architecture, or reads the CUBIN from the cache in
    /// `cache_dir`; HIP loads the embedded code object for the world size and the GPU's
    /// architecture (`cache_dir` unused). Returns the functions and whether they came from the
    /// disk cache.
    ///
    /// # Errors
    /// [`crate::Error::Unsupported`] for a GPU the kernels cannot run on (older than sm_80; an
    /// AMD architecture without code objects; a world size without them);
    /// [`crate::Error::Compile`]; the vendor's error when loading fails or an entry point is
    /// missing.
    pub(crate) fn load<K: Copy + Eq + std::hash::Hash>(
        &self,
        ctx: &std::sync::Arc<super::Context>,
        world: usize,
        cache_dir: Option<std::path::PathBuf>,
        kinds: &[K],
        name: fn(K) -> &'static str,
        what: &str,
    ) -> crate::Result<(Functions<K>, bool)> {
        let (module, from_disk) = super::load_module(ctx, self, world, cache_dir, what)?;
        let mut funcs = std::collections::HashMap::new();
        for &k in kinds {
            for dtype in DTYPES {
                let entry = entry(name(k), dtype).ok_or_else(|| unsupported_dtype(name(k), dtype))?;
                funcs.insert((k, dtype), super::function(&module, &entry)?);
            }
        }
        Ok((funcs, from_disk))
    }

    /// Every entry point of the family.
    #[cfg_attr(all(feature = "rocm", not(test)), allow(dead_code))]
    pub(crate) fn entries(&self) -> Vec<String> {
        self.algos.iter().flat_map(|a| DTYPES.iter().filter_map(move |&d| entry(a, d))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_the_naming_rule_and_exist_in_the_sources() {
        assert_eq!(
            CUSTOM.entries(),
            [
                "oneshot_f32",
                "oneshot_f16",
                "oneshot_bf16",
                "oneshot_norm_f32",
                "oneshot_norm_f16",
                "oneshot_norm_bf16",
                "twoshot_f32",
                "twoshot_f16",
                "twoshot_bf16",
                "twoshot_direct_f32",
                "twoshot_direct_f16",
                "twoshot_direct_bf16",
                "twoshot_norm_f32",
                "twoshot_norm_f16",
                "twoshot_norm_bf16"
            ]
        );
        assert_eq!(entry("lamport", DType::F64), None);
        for family in FAMILIES {
            for e in family.entries() {
                assert!(family.source.contains(&format!("({e},")), "{}: no entry {e} in the source", family.name);
            }
        }
    }
}
