//! Compiles every kernel variant through NVRTC for sm_90, without a GPU.
//!
//! Runs wherever an NVRTC library can be loaded (put its folder on `LD_LIBRARY_PATH`, e.g. the
//! one `pip install nvidia-cuda-nvrtc` brings); elsewhere it says loudly that it was skipped.

use std::io::Write;
use tpcomm::cuda::{kernels, module_cache, protocol};

/// Say that the kernels were not compiled, past the test harness's output capture (which
/// swallows `eprintln!` of passing tests), so a run without NVRTC cannot look like a pass.
/// Under CI (`CI` set, as CI services do) a missing NVRTC is a failure: CI installs it.
fn skipped(test: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: no NVRTC library found under CI; mpirun-scripts/setup.sh installs nvidia-cuda-nvrtc");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: no NVRTC library found, the CUDA kernels were NOT compiled (put the folder \
         holding libnvrtc.so.13 on LD_LIBRARY_PATH, e.g. from `pip install nvidia-cuda-nvrtc`)"
    );
}

/// Compile `src` for every world size and check that each entry point is in the CUBIN.
fn compile_every_world(test: &str, name: &str, src: &str, defines: fn(usize) -> Vec<String>, entries: &[&str]) {
    if !module_cache::nvrtc_present() {
        skipped(test);
        return;
    }
    let version = module_cache::nvrtc_version().expect("NVRTC version");
    eprintln!("compiling {name} with NVRTC {}.{}", version.0, version.1);
    for world in 1..=protocol::MAX_RANKS {
        let bin = module_cache::compile_cubin(name, src, &defines(world), (9, 0))
            .unwrap_or_else(|e| panic!("{name}, world {world}: {e}"));
        assert!(bin.starts_with(b"\x7fELF"), "{name}, world {world}: not a CUBIN (ELF) image");
        for entry in entries {
            assert!(bin.windows(entry.len()).any(|w| w == entry.as_bytes()), "{name}, world {world}: {entry} missing");
        }
    }
}

#[test]
fn every_custom_allreduce_variant_compiles_for_sm90() {
    compile_every_world(
        "every_custom_allreduce_variant_compiles_for_sm90",
        kernels::CUSTOM_ALLREDUCE_NAME,
        kernels::CUSTOM_ALLREDUCE,
        protocol::defines,
        &kernels::CUSTOM_ALLREDUCE_ENTRIES,
    );
}

#[test]
fn every_packet_allreduce_variant_compiles_for_sm90() {
    compile_every_world(
        "every_packet_allreduce_variant_compiles_for_sm90",
        kernels::PACKET_ALLREDUCE_NAME,
        kernels::PACKET_ALLREDUCE,
        protocol::packet_defines,
        &kernels::PACKET_ALLREDUCE_ENTRIES,
    );
}

#[test]
fn missing_defines_are_a_compile_error_with_the_log() {
    if !module_cache::nvrtc_present() {
        skipped("missing_defines_are_a_compile_error_with_the_log");
        return;
    }
    let err = module_cache::compile_cubin("custom_allreduce", kernels::CUSTOM_ALLREDUCE, &[], (9, 0)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("protocol defines are missing"), "{text}");
}
