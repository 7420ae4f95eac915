//! With the `rocm` feature, compiles every kernel family for every world size for the AMD GPUs
//! tpcomm targets (gfx90a = MI200, gfx942 = MI300) with clang-19, header-less and without ROCm,
//! and writes a table of the code objects for `src/runtime/hip/mod.rs` to embed. Without the
//! feature it does nothing. The sources and defines are the CUDA build's own
//! (`kernels/`, `src/runtime/protocol.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "src/runtime/protocol.rs"]
mod protocol;

/// Each family: its name, its files (in order, as `src/runtime/kernels.rs` concatenates them;
/// a test there checks that the two lists agree) and its defines.
type Defines = fn(usize) -> Vec<String>;
const FAMILIES: [(&str, &[&str], Defines); 4] = [
    (
        "custom_allreduce",
        &["portable.cuh", "common.cuh", "barrier.cuh", "rms_norm.cuh", "custom_allreduce.cu"],
        protocol::defines,
    ),
    ("packet_allreduce", &["portable.cuh", "common.cuh", "packet_allreduce.cu"], protocol::packet_defines),
    ("quick_allreduce", &["portable.cuh", "common.cuh", "barrier.cuh", "quick_allreduce.cu"], protocol::quick_defines),
    ("rms_norm", &["portable.cuh", "common.cuh", "rms_norm.cuh", "rms_norm.cu"], protocol::defines),
];

/// The AMD architectures, as clang names them.
const ARCHS: [&str; 2] = ["gfx90a", "gfx942"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/runtime/protocol.rs");
    println!("cargo:rerun-if-env-changed=HIP_CLANG");
    if std::env::var_os("CARGO_FEATURE_ROCM").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("HIP_CLANG").unwrap_or_else(|_| "clang-19".into());
    let mut jobs = Vec::new();
    for (name, files, defines) in FAMILIES {
        let source: String = files
            .iter()
            .map(|f| std::fs::read_to_string(Path::new("kernels").join(f)).expect("kernel source"))
            .collect();
        let src = out.join(format!("{name}.hip"));
        std::fs::write(&src, source).expect("write the HIP source");
        for world in 1..=protocol::MAX_RANKS {
            for arch in ARCHS {
                jobs.push((name, world, arch, src.clone(), out.join(format!("{name}_{world}_{arch}.co")), defines));
            }
        }
    }
    // A few compiles at a time: each clang holds a few hundred MB.
    for batch in jobs.chunks(8) {
        let running: Vec<_> = batch
            .iter()
            .map(|(name, world, arch, src, obj, defines)| {
                let child = Command::new(&clang)
                    .args(["-x", "hip", &format!("--offload-arch={arch}"), "-nogpulib", "-nogpuinc"])
                    .args(["--cuda-device-only", "--no-gpu-bundle-output", "-O3", "-fuse-ld=lld", "-Werror"])
                    .args(defines(*world))
                    .arg("-o")
                    .arg(obj)
                    .arg(src)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "the rocm feature compiles the kernels for AMD GPUs with {clang} and ld.lld-19 \
                             (apt-get install clang-19 lld-19, or set HIP_CLANG): {e}"
                        )
                    });
                (name, world, arch, child)
            })
            .collect();
        for (name, world, arch, child) in running {
            let done = child.wait_with_output().expect("wait for clang");
            if !done.status.success() {
                panic!("{name} for {arch}, world {world}:\n{}", String::from_utf8_lossy(&done.stderr));
            }
        }
    }
    let rows: String = jobs
        .iter()
        .map(|(name, world, arch, _, obj, _)| format!("    ({name:?}, {world}, {arch:?}, include_bytes!({obj:?})),\n"))
        .collect();
    let table = format!(
        "/// Every HIP code object: (family, world size, architecture, ELF bytes).\n\
         pub(crate) static CODE_OBJECTS: &[(&str, usize, &str, &[u8])] = &[\n{rows}];\n"
    );
    std::fs::write(out.join("hip_code_objects.rs"), table).expect("write the code object table");
}
