//! Compiles every kernel variant through NVRTC for sm_90, without a GPU.
//!
//! Runs wherever an NVRTC library can be loaded (put its folder on `LD_LIBRARY_PATH`, e.g. the
//! one `pip install nvidia-cuda-nvrtc` brings); elsewhere it says loudly that it was skipped.

use tpcomm::cuda::{kernels, module_cache, protocol};

#[test]
fn every_custom_allreduce_variant_compiles_for_sm90() {
    if !module_cache::nvrtc_present() {
        eprintln!(
            "SKIPPED kernels_compile: no NVRTC library found (set LD_LIBRARY_PATH to a folder holding \
             libnvrtc.so); the CUDA kernels were NOT compiled"
        );
        println!("SKIPPED kernels_compile: no NVRTC library found");
        return;
    }
    let version = module_cache::nvrtc_version().expect("NVRTC version");
    eprintln!("compiling with NVRTC {}.{}", version.0, version.1);
    for world in 1..=protocol::MAX_RANKS {
        let bin = module_cache::compile_cubin(
            kernels::CUSTOM_ALLREDUCE_NAME,
            kernels::CUSTOM_ALLREDUCE,
            &protocol::defines(world),
            (9, 0),
        )
        .unwrap_or_else(|e| panic!("world {world}: {e}"));
        assert!(bin.starts_with(b"\x7fELF"), "world {world}: not a CUBIN (ELF) image");
        for entry in kernels::CUSTOM_ALLREDUCE_ENTRIES {
            assert!(bin.windows(entry.len()).any(|w| w == entry.as_bytes()), "world {world}: {entry} missing");
        }
    }
}

#[test]
fn missing_defines_are_a_compile_error_with_the_log() {
    if !module_cache::nvrtc_present() {
        eprintln!("SKIPPED kernels_compile: no NVRTC library found");
        return;
    }
    let err = module_cache::compile_cubin("custom_allreduce", kernels::CUSTOM_ALLREDUCE, &[], (9, 0)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("protocol defines are missing"), "{text}");
}
