//! Compiles every kernel variant (each family, each world size 1..8) through NVRTC for sm_80,
//! sm_90 and sm_100, without a GPU, and checks that each CUBIN holds every entry point.
//!
//! A harness of its own (`harness = false`), so a run without NVRTC is reported as *skipped*,
//! never as passed: it ends `N passed, M failed, K skipped`. Under CI (`CI` set) a missing
//! NVRTC is a failure: CI installs it (`mpirun-scripts/setup.sh`). Put the folder holding
//! `libnvrtc.so.13` on `LD_LIBRARY_PATH` (for example from `pip install nvidia-cuda-nvrtc`).
//!
//! GPUs older than sm_80 get no IPC kernels (the dispatch sends their calls to NCCL): one check
//! proves the sources indeed do not compile for sm_75, so that fallback is needed.
//!
//! The same sources are compiled for AMD GPUs by `build.rs` with the `rocm` feature, and checked
//! by the tests of `src/runtime/hip/mod.rs` (`cargo test --features rocm hip`, run by test.sh).

// A ROCm build only prints why nothing is compiled here.
#![cfg_attr(feature = "rocm", allow(dead_code, unused_imports))]

use tpcomm::testing;

struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Tally {
    fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("ok      {name}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAILED  {name}: {e}");
            }
        }
    }
}

/// A ROCm build has no NVRTC path: `build.rs` compiled the kernels for AMD GPUs, and the tests of
/// `src/runtime/hip/mod.rs` check the code objects.
#[cfg(feature = "rocm")]
fn main() {
    println!("0 passed, 0 failed, 0 skipped: a ROCm build compiles the kernels in build.rs (see runtime/hip tests)");
}

#[cfg(not(feature = "rocm"))]
fn main() {
    let checks = [
        "every kernel compiles for sm_80",
        "every kernel compiles for sm_90",
        "every kernel compiles for sm_100",
        "the kernels need sm_80 (sm_75 is refused)",
        "missing protocol defines are a compile error with the log",
        "ptxas reports every entry's registers and local memory (sm_90)",
    ];
    let mut t = Tally { passed: 0, failed: 0, skipped: 0 };
    if !testing::nvrtc_present() {
        if std::env::var_os("CI").is_some() {
            println!("FAILED: no NVRTC library under CI; mpirun-scripts/setup.sh installs nvidia-cuda-nvrtc");
            std::process::exit(1);
        }
        for name in checks {
            t.skipped += 1;
            println!("SKIPPED {name}: no NVRTC library found, the CUDA kernels were NOT compiled");
        }
    } else {
        let (major, minor) = testing::nvrtc_version().expect("NVRTC version");
        println!("compiling every kernel variant with NVRTC {major}.{minor}");
        for (arch, name) in [((8, 0), checks[0]), ((9, 0), checks[1]), ((10, 0), checks[2])] {
            let failures: Vec<String> = testing::compile_every_kernel(arch)
                .into_iter()
                .filter_map(|(family, world, r)| r.err().map(|e| format!("{family}, world {world}: {e}")))
                .collect();
            t.check(name, if failures.is_empty() { Ok(()) } else { Err(failures.join("\n")) });
        }
        let old = testing::compile_every_kernel((7, 5));
        let refused = old.iter().all(|(_, _, r)| r.as_ref().is_err_and(|e| e.to_string().contains("sm_80")));
        t.check(
            checks[3],
            if refused { Ok(()) } else { Err("some variant compiled for sm_75, or failed otherwise".into()) },
        );
        let r = match testing::compile_without_defines() {
            Err(e) if e.to_string().contains("protocol defines are missing") => Ok(()),
            Err(e) => Err(format!("wrong error: {e}")),
            Ok(_) => Err("compiled without its defines".into()),
        };
        t.check(checks[4], r);
        // The report `examples/kernel_resources` prints: every entry of every family and world.
        let r = match testing::kernel_resources((9, 0), None, &[1, 2, 3, 4, 5, 6, 7, 8]) {
            Ok(rows) if rows.len() > 100 && rows.iter().all(|k| k.registers > 0) => Ok(()),
            Ok(rows) => Err(format!("{} entries reported, some without registers", rows.len())),
            Err(e) => Err(e.to_string()),
        };
        t.check(checks[5], r);
    }
    println!("kernels_compile: {} passed, {} failed, {} skipped", t.passed, t.failed, t.skipped);
    if t.failed > 0 {
        std::process::exit(1);
    }
}
