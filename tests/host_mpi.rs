//! Integration tests as real MPI jobs: the host backend, the device layer on the CPU stand-in
//! of the device backends, set-up, and a randomized fault suite.
//!
//! Run by plain `cargo test`: this binary (harness = false) is the launcher. For each case it
//! starts itself under `mpiexec -n k` with `TPCOMMTEST_CASE` set; the copies it starts are the
//! ranks, which run the case and exit non-zero on any failure. Every job runs under a
//! wall-clock limit, so a protocol bug fails the test instead of hanging it. The launcher ends
//! with `N passed, M failed`.
//!
//! The device cases build communicators with the CPU stand-in (`mock_device()`): the real plan,
//! chunking, hierarchy steps, failure state and set-up run, with every device backend replaced
//! by an exact rank-order sum over MPI, so their results are checked bit for bit without a GPU.

use mpi::traits::Communicator as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tpcomm::testing::{mock_all_reduce, mock_all_reduce_add_rms_norm};
use tpcomm::verify::{
    add_rms_norm_reference, count_wrong, expected_hierarchical_sum, first_wrong, poison, rank_input, SplitMix64,
};
use tpcomm::{bf16, f16, Algo, CallOptions, Communicator, Config, Element, Error, Fusion};

const CASE_VAR: &str = "TPCOMMTEST_CASE";
const JOB_LIMIT: Duration = Duration::from_secs(240);

fn main() {
    match std::env::var(CASE_VAR) {
        Ok(case) => std::process::exit(worker(&case)),
        Err(_) => launcher(),
    }
}

// ---------------------------------------------------------------- launcher

struct Job {
    case: &'static str,
    ranks: usize,
    env: &'static [(&'static str, &'static str)],
}

fn launcher() {
    let mut jobs = Vec::new();
    for ranks in 1..=4 {
        jobs.push(Job { case: "exact", ranks, env: &[] });
        // Small chunks: long messages cross many chunk boundaries and buffer parities.
        jobs.push(Job { case: "exact", ranks, env: &[("TPCOMM_HOST_CHUNK_BYTES", "4096")] });
        // The device layer on the CPU stand-in; small IPC limits make calls chunk.
        jobs.push(Job { case: "mock_exact", ranks, env: &[("TPCOMM_CUSTOM_MAX_BYTES", "8192")] });
    }
    for ranks in 2..=4 {
        jobs.push(Job {
            case: "exact",
            ranks,
            env: &[("TPCOMM_FAKE_NODES", "2"), ("TPCOMM_HOST_CHUNK_BYTES", "8192")],
        });
        jobs.push(Job {
            case: "mock_exact",
            ranks,
            env: &[("TPCOMM_FAKE_NODES", "2"), ("TPCOMM_CUSTOM_MAX_BYTES", "8192")],
        });
        jobs.push(Job { case: "mismatched_lengths", ranks, env: &[("TPCOMM_TIMEOUT_MS", "20000")] });
        jobs.push(Job { case: "rank_skips_call", ranks, env: &[("TPCOMM_TIMEOUT_MS", "1500")] });
        jobs.push(Job { case: "input_output_lengths_differ", ranks, env: &[("TPCOMM_TIMEOUT_MS", "20000")] });
        jobs.push(Job { case: "forced_algorithms", ranks, env: &[] });
        jobs.push(Job { case: "abort_and_rebuild", ranks, env: &[("TPCOMM_TIMEOUT_MS", "20000")] });
        jobs.push(Job { case: "setup_rank_never_arrives", ranks, env: &[("TPCOMM_TIMEOUT_MS", "1000")] });
    }
    for ranks in [2, 3, 4] {
        jobs.push(Job { case: "fault_suite", ranks, env: &[("TPCOMM_TIMEOUT_MS", "800")] });
    }
    jobs.push(Job { case: "fault_suite", ranks: 4, env: &[("TPCOMM_TIMEOUT_MS", "800"), ("TPCOMM_FAKE_NODES", "2")] });
    jobs.push(Job { case: "exact", ranks: 4, env: &[("TPCOMM_FAKE_NODES", "4")] });
    jobs.push(Job { case: "nodes_disagree_on_length", ranks: 4, env: &[("TPCOMM_FAKE_NODES", "2")] });
    jobs.push(Job {
        case: "rank_skips_call",
        ranks: 4,
        env: &[("TPCOMM_TIMEOUT_MS", "1500"), ("TPCOMM_FAKE_NODES", "2")],
    });
    jobs.push(Job { case: "different_config_per_rank", ranks: 3, env: &[] });
    jobs.push(Job { case: "tune_save_and_load", ranks: 2, env: &[] });
    for ranks in [1, 3] {
        jobs.push(Job { case: "byte_exchange", ranks, env: &[] });
    }
    jobs.push(Job { case: "tune_save_and_load", ranks: 3, env: &[("TPCOMM_FAKE_NODES", "2")] });
    for ranks in [3, 4] {
        jobs.push(Job { case: "batch_invariance", ranks, env: &[("TPCOMM_HOST_CHUNK_BYTES", "4096")] });
    }
    for ranks in [1, 2, 3, 4] {
        jobs.push(Job {
            case: "deterministic",
            ranks,
            env: &[
                ("TPCOMM_DETERMINISTIC", "1"),
                ("TPCOMM_HOST_CHUNK_BYTES", "4096"),
                ("TPCOMM_CUSTOM_MAX_BYTES", "8192"),
            ],
        });
    }
    jobs.push(Job {
        case: "deterministic",
        ranks: 4,
        env: &[("TPCOMM_DETERMINISTIC", "1"), ("TPCOMM_FAKE_NODES", "2"), ("TPCOMM_HOST_CHUNK_BYTES", "8192")],
    });
    for ranks in 1..=4 {
        jobs.push(Job { case: "mock_norm", ranks, env: &[] });
        // A small IPC limit: larger calls cannot fuse and go split (through NCCL on the stand-in).
        jobs.push(Job { case: "mock_norm", ranks, env: &[("TPCOMM_CUSTOM_MAX_BYTES", "8192")] });
    }
    // Across pretend nodes: never fused; the hierarchy up to the IPC limit, flat NCCL above.
    jobs.push(Job {
        case: "mock_norm",
        ranks: 4,
        env: &[("TPCOMM_FAKE_NODES", "2"), ("TPCOMM_CUSTOM_MAX_BYTES", "8192")],
    });
    for ranks in 1..=4 {
        jobs.push(Job {
            case: "mock_quick",
            ranks,
            env: &[("TPCOMM_QUICK", "int8"), ("TPCOMM_QUICK_MIN_BYTES", "4K")],
        });
    }
    jobs.push(Job {
        case: "mock_quick",
        ranks: 3,
        env: &[("TPCOMM_QUICK", "int8"), ("TPCOMM_QUICK_MIN_BYTES", "4K"), ("TPCOMM_DETERMINISTIC", "1")],
    });
    for ranks in [1, 2] {
        jobs.push(Job { case: "device_unsupported", ranks, env: &[] });
    }
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_QUICK", "int5")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_ALGO", "fastest")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_ALGO", "nccl"), ("TPCOMM_DETERMINISTIC", "1")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_TIMEOUT_MS", "-3")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_NO_SUCH_KNOB", "1")] });

    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for job in jobs.iter().filter(|j| filter.as_deref().is_none_or(|f| j.case.contains(f))) {
        let name = format!("{} ranks={} {:?}", job.case, job.ranks, job.env);
        let start = Instant::now();
        match run_job(job) {
            Ok(Ran::Passed) => {
                passed += 1;
                println!("ok     {name} ({:.1} s)", start.elapsed().as_secs_f64());
            }
            Ok(Ran::Skipped(why)) => {
                skipped += 1;
                println!("SKIPPED {name}: {why}");
            }
            Err(log) => {
                failed += 1;
                println!("FAILED {name}\n{log}");
            }
        }
    }
    println!("host_mpi: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}

fn mpiexec() -> Command {
    let exe = std::env::var("MPIEXEC").unwrap_or_else(|_| "mpiexec".into());
    let mut cmd = Command::new(&exe);
    let version = Command::new(&exe).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let version = version.unwrap_or_default();
    if version.contains("Open MPI") || version.contains("OpenRTE") || version.contains("open-mpi") {
        // More ranks than cores, and root (containers, CI): Open MPI refuses both by default.
        cmd.arg("--oversubscribe");
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        cmd.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    }
    cmd
}

/// How a job that did not fail ended.
enum Ran {
    Passed,
    /// Every rank exited with [`SKIP_EXIT`]: the case cannot run on this machine (the reason is
    /// the ranks' `SKIPPED:` line).
    Skipped(String),
}

/// The exit code of a rank whose case cannot run here (automake's convention).
const SKIP_EXIT: i32 = 77;

fn run_job(job: &Job) -> Result<Ran, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = mpiexec();
    cmd.arg("-n").arg(job.ranks.to_string()).arg(exe);
    let dir = std::env::temp_dir().join(format!("tpcomm-test-{}-{}-{}", std::process::id(), job.case, job.ranks));
    cmd.env(CASE_VAR, job.case).env("TPCOMMTEST_RANKS", job.ranks.to_string()).env("TPCOMMTEST_DIR", &dir);
    for (k, v) in job.env {
        cmd.env(k, v);
    }
    let log = std::env::temp_dir().join(format!("tpcomm-test-{}-{}.log", std::process::id(), job.case));
    let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdout(Stdio::from(file.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(file))
        .spawn()
        .map_err(|e| format!("cannot start mpiexec (install Open MPI: apt-get install openmpi-bin): {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if start.elapsed() > JOB_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Some(s) if s.success() => Ok(Ran::Passed),
        Some(s) if s.code() == Some(SKIP_EXIT) => {
            let why = output.lines().find_map(|l| l.split_once("SKIPPED: ").map(|(_, w)| w.to_string()));
            Ok(Ran::Skipped(why.unwrap_or_else(|| "no reason given".into())))
        }
        Some(s) => Err(format!("exit status {s}\n{output}")),
        None => Err(format!("killed after {} s (hang)\n{output}", JOB_LIMIT.as_secs())),
    }
}

// ---------------------------------------------------------------- ranks

type World = mpi::topology::SimpleCommunicator;

/// Runs one case on this rank; returns the process exit code.
fn worker(case: &str) -> i32 {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            // The only case that expects this is invalid_config.
            if case == "invalid_config" && matches!(e, Error::Config { .. }) {
                println!("rank ok: configuration refused: {e}");
                return 0;
            }
            println!("FAIL: configuration: {e}");
            return 1;
        }
    };
    if case == "invalid_config" {
        println!("FAIL: the invalid configuration was accepted: {config:?}");
        return 1;
    }
    let result = match case {
        "different_config_per_rank" => different_config_per_rank(&world, config),
        "byte_exchange" => byte_exchange(&world),
        "tune_save_and_load" => tune_save_and_load(&world, config),
        "setup_rank_never_arrives" => setup_rank_never_arrives(&world, config),
        "fault_suite" => fault_suite(&world, config),
        "abort_and_rebuild" => abort_and_rebuild(&world, config),
        _ => match build(
            &world,
            config,
            case.starts_with("mock") || case == "deterministic" || case == "forced_algorithms",
        ) {
            Err(e) => Err(format!("Communicator::new: {e}")),
            Ok(comm) => match case {
                "exact" => exact(&comm),
                "mock_exact" => mock_exact(&comm),
                "mock_quick" => mock_quick(&comm),
                "mock_norm" => mock_norm(&comm, &world),
                "forced_algorithms" => forced_algorithms(&comm),
                "mismatched_lengths" => mismatched_lengths(&comm),
                "batch_invariance" => batch_invariance(&comm),
                "deterministic" => deterministic(&comm),
                "nodes_disagree_on_length" => nodes_disagree_on_length(&comm),
                "rank_skips_call" => rank_skips_call(&comm),
                "input_output_lengths_differ" => input_output_lengths_differ(&comm),
                "device_unsupported" => device_unsupported(&comm),
                other => Err(format!("unknown case {other}")),
            },
        },
    };
    match result {
        Ok(summary) => {
            println!("rank {} ok: {summary}", world.rank());
            0
        }
        Err(msg) if msg.starts_with("SKIPPED: ") => {
            println!("rank {} {msg}", world.rank());
            SKIP_EXIT
        }
        Err(msg) => {
            println!("FAIL rank {}: {msg}", world.rank());
            1
        }
    }
}

/// A communicator, with the CPU stand-in of the device backends when `mock`.
fn build(world: &World, config: Config, mock: bool) -> tpcomm::Result<Communicator> {
    let b = Communicator::builder(world).config(config);
    if mock {
        b.mock_device().build()
    } else {
        b.build()
    }
}

/// Host memory aligned as the IPC kernels' pointers must be (16 bytes), for the stand-in.
struct Aligned<T> {
    words: Vec<u128>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> Aligned<T> {
    fn from(data: &[T]) -> Self {
        let mut a = Aligned {
            words: vec![0u128; std::mem::size_of_val(data).div_ceil(16) + 1],
            len: data.len(),
            _t: std::marker::PhantomData,
        };
        a.as_mut().copy_from_slice(data);
        a
    }
    fn as_mut(&mut self) -> &mut [T] {
        // SAFETY: the words hold at least len elements of T; u128 alignment covers T's.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut T, self.len) }
    }
    fn ptr(&mut self) -> *mut T {
        self.words.as_mut_ptr() as *mut T
    }
}

/// A device call on the stand-in, out of place (`input` given) or in place.
fn mock_call<T: Element>(
    comm: &Communicator,
    opts: &CallOptions,
    input: Option<&[T]>,
    out: &mut Aligned<T>,
) -> tpcomm::Result<()> {
    let len = out.len;
    match input {
        Some(x) => {
            let mut inp = Aligned::from(x);
            // SAFETY: both buffers hold `len` elements and outlive the (synchronous) call.
            unsafe { mock_all_reduce(comm, opts, inp.ptr(), out.ptr(), len) }
        }
        // SAFETY: as above; in place.
        None => unsafe { mock_all_reduce(comm, opts, out.ptr(), out.ptr(), len) },
    }
}

/// One call of `input` through the device stand-in (`device`) or host memory, in place (the
/// output buffer first holds `input`) or not, into a poisoned output; the call's result and the
/// output.
fn reduce_once<T: Element>(
    comm: &Communicator,
    opts: &CallOptions,
    device: bool,
    in_place: bool,
    input: &[T],
) -> (tpcomm::Result<()>, Vec<T>) {
    let len = input.len();
    if device {
        let mut out = Aligned::from(&vec![poison::<T>(); len]);
        let r = if in_place {
            out.as_mut().copy_from_slice(input);
            mock_call(comm, opts, None, &mut out)
        } else {
            mock_call(comm, opts, Some(input), &mut out)
        };
        (r, out.as_mut().to_vec())
    } else {
        let mut out = vec![poison::<T>(); len];
        let r = if in_place {
            out.copy_from_slice(input);
            comm.all_reduce_host_with(opts, None, &mut out)
        } else {
            comm.all_reduce_host_with(opts, Some(input), &mut out)
        };
        (r, out)
    }
}

/// Sizes from 0 elements to several MiB: edge cases plus random ones.
fn sizes(seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed, 99);
    let mut v = vec![0, 1, 2, 3, 7, 15, 16, 17, 63, 64, 65, 1023, 4097, 1 << 16, (3 << 20) / 4 + 5];
    v.extend((0..6).map(|_| rng.below(1 << 14) as usize));
    v.extend((0..3).map(|_| rng.below(3 << 20) as usize));
    v
}

fn exact(comm: &Communicator) -> Result<String, String> {
    let mut checks = 0;
    for dtype_case in 0..4 {
        checks += match dtype_case {
            0 => exact_for::<f32>(comm, false)?,
            1 => exact_for::<f64>(comm, false)?,
            2 => exact_for::<f16>(comm, false)?,
            _ => exact_for::<bf16>(comm, false)?,
        };
    }
    Ok(format!("{checks} results bit-exact"))
}

/// Without a GPU of the build's vendor (every CI machine), `init_device` is a typed
/// `Unsupported` on every rank that says what is missing (a CUDA driver; with the rocm feature,
/// an AMD GPU), asking again gives the same answer, and the communicator still reduces host
/// memory bit for bit. Where such a GPU is present the case cannot run and says so (skipped).
fn device_unsupported(comm: &Communicator) -> Result<String, String> {
    let expected: &[&str] =
        if cfg!(feature = "rocm") { &["AMD GPU", "HIP runtime"] } else { &["CUDA driver", "CUDA_ERROR_NO_DEVICE"] };
    for attempt in 0..2 {
        match comm.init_device() {
            Ok(()) => return Err("SKIPPED: this machine has a GPU the device layer can use".into()),
            Err(Error::Unsupported { what, reason }) => {
                if !expected.iter().any(|e| reason.contains(e)) {
                    return Err(format!("attempt {attempt}: {what}: {reason}: names none of {expected:?}"));
                }
            }
            Err(e) => return Err(format!("attempt {attempt}: init_device gave {e:?}, not Unsupported")),
        }
    }
    let checks = exact_for::<f32>(comm, false)?;
    Ok(format!("device memory refused with a typed error; then {checks} host results bit-exact"))
}

/// The device layer on the stand-in: the dispatch's choice and every forced algorithm that can
/// serve the call, in place and not, give the exact bits of the plan in force (rank order on
/// one node; node partials in node order across pretend nodes).
fn mock_exact(comm: &Communicator) -> Result<String, String> {
    comm.init_device().map_err(|e| format!("init_device: {e}"))?;
    let mut checks = exact_for::<f32>(comm, true)?;
    checks += exact_for::<bf16>(comm, true)?;
    checks += exact_for::<f16>(comm, true)?;
    Ok(format!("{checks} device results (CPU stand-in) bit-exact"))
}

fn exact_for<T: Element>(comm: &Communicator, device: bool) -> Result<usize, String> {
    let (rank, n) = (comm.rank(), comm.size());
    let layout = comm.layout();
    let rank_to_node = layout.rank_to_node.clone();
    let mut checks = 0;
    // The same seed on every rank: sizes agree, inputs differ by rank.
    let base_seed = 0x5eed ^ (n as u64) << 8 ^ T::DTYPE as u64;
    let one_node = layout.nodes == 1;
    for (i, &len) in sizes(base_seed).iter().enumerate() {
        // The stand-in moves every byte through MPI: chunking is covered at small sizes (the
        // jobs lower the IPC limit), so the multi-MiB sizes are host-only.
        if device && len > 1 << 18 {
            continue;
        }
        let bytes = len * size_of::<T>();
        let algos: Vec<Option<Algo>> = if !device {
            // Large messages once per dtype and algorithm is plenty; keep the job quick.
            if len > 1 << 18 {
                vec![Some(Algo::HostTwoShot)]
            } else {
                vec![None, Some(Algo::HostOneShot), Some(Algo::HostTwoShot)]
            }
        } else {
            let mut a = vec![None];
            if one_node && n > 1 && len <= 1 << 18 {
                a.push(Some(Algo::Chunked));
                if bytes <= 8192 {
                    a.extend([Some(Algo::OneShot), Some(Algo::TwoShot)]);
                }
                if bytes <= comm.config().packet_buffer_bytes {
                    a.extend([Some(Algo::Packet), Some(Algo::Lamport), Some(Algo::PacketTwoPhase)]);
                }
            }
            if !one_node && len <= 4096 {
                a.push(Some(Algo::Hierarchical));
            }
            a
        };
        for (a, algo) in algos.iter().enumerate() {
            for in_place in [false, true] {
                let seed = base_seed.wrapping_mul(31).wrapping_add((i * 16 + a * 2 + in_place as usize) as u64);
                let input: Vec<T> = rank_input(seed, rank, len);
                let opts = CallOptions { algo: *algo, ..CallOptions::default() };
                let (res, out) = reduce_once(comm, &opts, device, in_place, &input);
                let what = format!("{} len {len} algo {algo:?} in_place {in_place}", T::DTYPE);
                res.map_err(|e| format!("{what}: {e}"))?;
                if device {
                    // What served the call is the forced algorithm or the dispatch's choice (the
                    // stand-in's buffers never take the direct two-shot above the staging size).
                    let planned = match (algo, in_place) {
                        (Some(a), _) => Ok(*a),
                        (None, false) => comm.device_algo::<T>(len),
                        (None, true) => comm.device_algo_in_place::<T>(len),
                    };
                    let planned = planned.map_err(|e| format!("{what}: {e}"))?;
                    if comm.last_device_algo() != Some(planned) {
                        return Err(format!("{what}: served by {:?}, planned {planned}", comm.last_device_algo()));
                    }
                }
                // Flat NCCL (above the IPC limit across nodes) sums over all ranks at once: on the
                // stand-in in flat rank order (real NCCL in its own order, checked within a
                // tolerance on the GPU).
                let flat =
                    device && algo.is_none() && comm.device_algo::<T>(len).map_err(|e| e.to_string())? == Algo::Nccl;
                let want: Vec<T> = if flat {
                    tpcomm::verify::expected_sum(seed, n, len)
                } else {
                    expected_hierarchical_sum(seed, &rank_to_node, len)
                };
                let wrong = count_wrong(&out, &want);
                if wrong > 0 {
                    let first = out.iter().zip(&want).position(|(a, b)| !tpcomm::verify::same_bits(*a, *b)).unwrap();
                    return Err(format!(
                        "{what}: {wrong} wrong elements, first at {first}: got {:?} want {:?}",
                        out[first], want[first]
                    ));
                }
                checks += 1;
            }
        }
    }
    Ok(checks)
}

/// Forced algorithms that cannot serve a call are errors on every rank, before anything is
/// sent, and leave the communicator usable; `copy` with several ranks would hand back each
/// rank's own input, so it must be refused.
fn forced_algorithms(comm: &Communicator) -> Result<String, String> {
    comm.init_device().map_err(|e| format!("init_device: {e}"))?;
    let n = comm.size();
    let input: Vec<f32> = rank_input(11, comm.rank(), 1000);
    let mut out = Aligned::from(&vec![poison::<f32>(); 1000]);
    let refuse = |algo: Algo, what: &str, r: tpcomm::Result<()>| match r {
        Err(Error::InvalidUsage { .. }) => Ok(()),
        other => Err(format!("forced {algo} ({what}) gave {other:?}, not InvalidUsage")),
    };
    refuse(
        Algo::Copy,
        "device, several ranks",
        mock_call(comm, &CallOptions::algo(Algo::Copy), Some(&input), &mut out),
    )?;
    refuse(
        Algo::HostOneShot,
        "on device memory",
        mock_call(comm, &CallOptions::algo(Algo::HostOneShot), Some(&input), &mut out),
    )?;
    refuse(
        Algo::Hierarchical,
        "one node",
        mock_call(comm, &CallOptions::algo(Algo::Hierarchical), Some(&input), &mut out),
    )?;
    refuse(
        Algo::OneShot,
        "on host memory",
        comm.all_reduce_host_with(&CallOptions::algo(Algo::OneShot), Some(&input), out.as_mut()),
    )?;
    let big: Vec<f32> = rank_input(12, comm.rank(), (2 << 20) / 4);
    let mut big_out = Aligned::from(&big);
    refuse(
        Algo::Packet,
        "over the packet buffer",
        mock_call(comm, &CallOptions::algo(Algo::Packet), Some(&big), &mut big_out),
    )?;
    // Still usable, and exact.
    let mut out = Aligned::from(&vec![poison::<f32>(); 1000]);
    mock_call(comm, &CallOptions::default(), Some(&input), &mut out).map_err(|e| format!("after the refusals: {e}"))?;
    let want: Vec<f32> = tpcomm::verify::expected_sum(11, n, 1000);
    if count_wrong(out.as_mut(), &want) > 0 {
        return Err("a call after the refusals was wrong".into());
    }
    let mut host = input.clone();
    comm.all_reduce_host_in_place(&mut host).map_err(|e| format!("host after the refusals: {e}"))?;
    if count_wrong(&host, &want) > 0 {
        return Err("a host call after the refusals was wrong".into());
    }
    Ok("every impossible forced algorithm refused on every rank, communicator still exact".into())
}

/// The quick codecs through the device layer on the stand-in (whose quick "kernel" is the host
/// model, `tpcomm::quant::quick_reference`): `TPCOMM_QUICK=int8` with a 4 KiB minimum makes the
/// dispatch choose it from 4 KiB on (never in deterministic mode, nor at one rank), other codecs
/// can be forced per call (deterministic mode included), every result is the model's and
/// within the bound (and, above the minimum, not the exact sum: the codec really ran), doubles
/// are refused on every rank and the communicator stays usable.
fn mock_quick(comm: &Communicator) -> Result<String, String> {
    use tpcomm::quant::{count_outside_bound, quick_reference, Codec};
    comm.init_device().map_err(|e| format!("init_device: {e}"))?;
    let (n, rank) = (comm.size(), comm.rank());
    let det = comm.config().deterministic;
    let mut checked = 0;
    for (k, len) in [1usize, 31, 33, 1000, 2048, 4097, 70_000].into_iter().enumerate() {
        let seed = 0x9u64 + k as u64;
        let inputs: Vec<Vec<bf16>> = (0..n).map(|r| rank_input(seed, r, len)).collect();
        let views: Vec<&[bf16]> = inputs.iter().map(|x| &x[..]).collect();
        let exact = tpcomm::verify::reference_sum(&views);
        let chosen = comm.device_algo::<bf16>(len).map_err(|e| e.to_string())?;
        let quick_expected = len * 2 >= 4096 && n > 1 && !det;
        if (chosen == Algo::QuickInt8) != quick_expected {
            return Err(format!("{len} elements: the dispatch chose {chosen} (quick expected: {quick_expected})"));
        }
        let forced = [None, Some(Codec::Int4), Some(Codec::Fp8), Some(Codec::Int6)];
        for (codec, in_place) in forced.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let opts = codec.map_or_else(CallOptions::default, |c| CallOptions::algo(Algo::quick(c)));
            let (r, got) = reduce_once(comm, &opts, true, in_place, &inputs[rank]);
            r.map_err(|e| format!("{len} elements, {codec:?}: {e}"))?;
            let used = codec.or((chosen == Algo::QuickInt8).then_some(Codec::Int8));
            let want = used.map_or_else(|| exact.clone(), |c| quick_reference(c, &views));
            if count_wrong(&got, &want) > 0 {
                return Err(format!("{len} elements, {used:?}, in place {in_place}: not the expected bits"));
            }
            if let Some(c) = used {
                if count_outside_bound(c, &got, &views) > 0 {
                    return Err(format!("{len} elements, {c}: outside the bound"));
                }
                if n > 1 && len >= 1000 && count_wrong(&got, &exact) == 0 {
                    return Err(format!("{len} elements, {c}: the exact sum came back (the codec did not run)"));
                }
            }
            checked += 1;
        }
    }
    let d: Vec<f64> = rank_input(5, rank, 100);
    let (r, _) = reduce_once(comm, &CallOptions::algo(Algo::QuickInt8), true, false, &d);
    if !matches!(r, Err(Error::Unsupported { .. })) {
        return Err(format!("quick on f64 gave {r:?}, not Unsupported"));
    }
    let x: Vec<f32> = rank_input(6, rank, 500);
    let (r, got) = reduce_once(comm, &CallOptions::default(), true, false, &x);
    r.map_err(|e| format!("after the f64 refusal: {e}"))?;
    if count_wrong(&got, &tpcomm::verify::expected_sum(6, n, 500)) > 0 {
        return Err("an exact call after the refusal was wrong".into());
    }
    Ok(format!("{checked} quick calls: the model's bits, within the bound, chosen as configured"))
}

/// One `all_reduce_add_rms_norm` on the stand-in. Out of place: into poisoned outputs, and
/// `input` and `residual` must come back untouched; in place: `norm_out` is the input's buffer
/// and `residual_out` the residual's. The call's result, `(norm_out, residual_out)`, and whether
/// the inputs were left intact.
fn norm_once<T: Element>(
    comm: &Communicator,
    opts: &CallOptions,
    input: &[T],
    residual: &[T],
    weight: &[T],
    eps: f32,
    in_place: bool,
) -> (tpcomm::Result<()>, Vec<T>, Vec<T>, bool) {
    let (len, hidden) = (input.len(), weight.len());
    let mut x = Aligned::from(input);
    let mut r = Aligned::from(residual);
    let mut w = Aligned::from(weight);
    if in_place {
        let (xp, rp) = (x.ptr(), r.ptr());
        // SAFETY: every buffer holds its length and outlives the (synchronous) call; in place.
        let res = unsafe { mock_all_reduce_add_rms_norm(comm, opts, xp, rp, w.ptr(), hidden, eps, xp, rp, len) };
        return (res, x.as_mut().to_vec(), r.as_mut().to_vec(), true);
    }
    let mut y = Aligned::from(&vec![poison::<T>(); len]);
    let mut ro = Aligned::from(&vec![poison::<T>(); len]);
    // SAFETY: as above; five distinct buffers.
    let res = unsafe {
        mock_all_reduce_add_rms_norm(comm, opts, x.ptr(), r.ptr(), w.ptr(), hidden, eps, y.ptr(), ro.ptr(), len)
    };
    let intact = count_wrong(x.as_mut(), input) == 0 && count_wrong(r.as_mut(), residual) == 0;
    (res, y.as_mut().to_vec(), ro.as_mut().to_vec(), intact)
}

/// `all_reduce_add_rms_norm` through the real checks, plan and device layer on the stand-in:
/// for bf16, f16 and f32, rows of 8, 128 and 4104 elements, 1, 3 and 17 tokens, each fusion
/// choice, in place and not, both outputs bit for bit the reference's (the allreduce's exact sum
/// of the plan in force, then `add_rms_norm_reference`). Auto fuses exactly where the layout and
/// the limits allow it (asserted through `norm_is_fused` before the call and `last_norm_fused`
/// after it); `Fusion::Fused` elsewhere is refused on every rank and leaves the communicator
/// usable, as f64 does; bad shapes are refused with InvalidArgument (which fails the group, so
/// they come last, each on a fresh communicator).
fn mock_norm(comm: &Communicator, world: &World) -> Result<String, String> {
    comm.init_device().map_err(|e| format!("init_device: {e}"))?;
    let start = Instant::now();
    let mut proved = false;
    let (mut checks, mut refused) = mock_norm_for::<bf16>(comm, &mut proved)?;
    for (c, r) in [mock_norm_for::<f16>(comm, &mut proved)?, mock_norm_for::<f32>(comm, &mut proved)?] {
        checks += c;
        refused += r;
    }
    if !proved {
        return Err("no call ran the check's self-test".into());
    }
    // f64 is refused on every rank alike, before anything is sent: the communicator stays usable.
    let d: Vec<f64> = rank_input(0xd0, comm.rank(), 64);
    let (r, ..) = norm_once(comm, &CallOptions::default(), &d, &d, &d[..8], 1e-6, false);
    if !matches!(r, Err(Error::Unsupported { .. })) {
        return Err(format!("all_reduce_add_rms_norm of f64 gave {r:?}, not Unsupported"));
    }
    let x: Vec<f32> = rank_input(0xd1, comm.rank(), 256);
    let (r, out) = reduce_once(comm, &CallOptions::default(), true, false, &x);
    r.map_err(|e| format!("an allreduce after the refusals: {e}"))?;
    if count_wrong(&out, &expected_hierarchical_sum(0xd1, &comm.layout().rank_to_node, 256)) > 0 {
        return Err("an allreduce after the refusals was wrong".into());
    }
    let took = start.elapsed();
    let bad = norm_bad_shapes(comm, world)?;
    Ok(format!("{checks} calls bit-exact, {refused} Fused refusals ({:.1} s); bad shapes: {bad}", took.as_secs_f64()))
}

/// The good calls of [`mock_norm`] for `T`: (calls checked, `Fusion::Fused` refusals).
fn mock_norm_for<T: Element<Acc = f32>>(comm: &Communicator, proved: &mut bool) -> Result<(usize, usize), String> {
    let (rank, n) = (comm.rank(), comm.size());
    let layout = comm.layout();
    let (nodes, rank_to_node) = (layout.nodes, layout.rank_to_node.clone());
    let custom = comm.config().custom_max_bytes;
    // norm_is_fused plans buffers no peer reaches: the fused one-shot's limit.
    let fused_max = comm.dispatch_table().fused_oneshot_max_bytes();
    let (mut checks, mut refused) = (0, 0);
    for (h, hidden) in [8usize, 128, 4104].into_iter().enumerate() {
        // The weight is the model's: the same on every rank.
        let weight: Vec<T> = rank_input(0x3e16 ^ (T::DTYPE as u64) << 8 ^ h as u64, 0, hidden);
        for (t, tokens) in [1usize, 3, 17].into_iter().enumerate() {
            let len = tokens * hidden;
            let bytes = len * size_of::<T>();
            let eps = [1e-6, 0.0, 1e-5][t];
            // The fused kernel is a one-shot within one node, at most one IPC call.
            let fusable = n > 1 && nodes == 1 && bytes <= custom;
            let auto_fused = fusable && bytes <= fused_max;
            for in_place in [false, true] {
                let fused = comm.norm_is_fused::<T>(len, hidden, in_place).map_err(|e| e.to_string())?;
                if fused != auto_fused {
                    return Err(format!(
                        "{} hidden {hidden} tokens {tokens} in place {in_place}: norm_is_fused {fused}, \
                         expected {auto_fused} ({n} ranks, {nodes} nodes, {bytes} bytes)",
                        T::DTYPE
                    ));
                }
            }
            // The split path's allreduce: across nodes the hierarchy (node partials in node order)
            // up to the IPC limit, flat NCCL (rank order on the stand-in) above; flat on one node.
            let hier = nodes > 1 && bytes <= custom;
            if nodes > 1 {
                let algo = comm.device_algo::<T>(len).map_err(|e| e.to_string())?;
                let want = if hier { Algo::Hierarchical } else { Algo::Nccl };
                if algo != want {
                    return Err(format!(
                        "{} x {len} across {nodes} nodes: the allreduce is {algo}, not {want}",
                        T::DTYPE
                    ));
                }
            }
            let mut variants = vec![(None, Fusion::Auto), (None, Fusion::Fused), (None, Fusion::Split)];
            if n > 1 && nodes == 1 {
                // The allreduce forced to chunks of the IPC limit: split, and Fused refused.
                variants.extend([(Some(Algo::Chunked), Fusion::Auto), (Some(Algo::Chunked), Fusion::Fused)]);
            }
            for (v, &(algo, fusion)) in variants.iter().enumerate() {
                for in_place in [false, true] {
                    let seed =
                        0x40_0000 ^ (T::DTYPE as u64) << 16 ^ (h * 64 + t * 16 + v * 2 + in_place as usize) as u64;
                    let what = format!(
                        "{} hidden {hidden} tokens {tokens} {fusion:?} algo {algo:?} in place {in_place}",
                        T::DTYPE
                    );
                    let input: Vec<T> = rank_input(seed, rank, len);
                    // The residual stream differs by rank, and every rank checks its own.
                    let residual: Vec<T> = rank_input(seed ^ 0x7e51d, rank, len);
                    let opts = CallOptions { algo, norm: fusion, ..CallOptions::default() };
                    let (res, y, ro, intact) = norm_once(comm, &opts, &input, &residual, &weight, eps, in_place);
                    if fusion == Fusion::Fused && (!fusable || algo.is_some()) {
                        // Refused alike on every rank, before anything is sent.
                        match res {
                            Err(Error::InvalidUsage { .. }) => {}
                            other => return Err(format!("{what}: expected InvalidUsage, got {other:?}")),
                        }
                        refused += 1;
                        continue;
                    }
                    res.map_err(|e| format!("{what}: {e}"))?;
                    if !intact {
                        return Err(format!("{what}: the call wrote its input or residual"));
                    }
                    // The path taken is reported after the call.
                    let want_fused = match fusion {
                        Fusion::Fused => true,
                        Fusion::Split => false,
                        Fusion::Auto => algo.is_none() && auto_fused,
                    };
                    if comm.last_norm_fused() != Some(want_fused) {
                        return Err(format!(
                            "{what}: last_norm_fused {:?}, expected {want_fused}",
                            comm.last_norm_fused()
                        ));
                    }
                    let sum: Vec<T> = if hier {
                        expected_hierarchical_sum(seed, &rank_to_node, len)
                    } else {
                        tpcomm::verify::expected_sum(seed, n, len)
                    };
                    let (want_y, want_ro) = add_rms_norm_reference(&sum, &residual, &weight, eps);
                    for (name, got, want) in [("norm_out", &y, &want_y), ("residual_out", &ro, &want_ro)] {
                        let wrong = count_wrong(got, want);
                        if wrong > 0 {
                            let first = first_wrong(got, want, 3);
                            return Err(format!("{what}: {name}: {wrong} of {len} wrong, first {first:?}"));
                        }
                    }
                    if !*proved {
                        // The check can fail: one changed element of either reference is reported.
                        for (got, want) in [(&y, &want_y), (&ro, &want_ro)] {
                            let mut bad = want.clone();
                            let k = len / 2;
                            bad[k] = T::from_f64(-bad[k].to_f64());
                            if count_wrong(got, &bad) != 1 {
                                return Err(format!("{what}: a corrupted reference was not caught"));
                            }
                        }
                        *proved = true;
                    }
                    checks += 1;
                }
            }
        }
    }
    Ok((checks, refused))
}

/// Bad shapes, each on a fresh communicator: every rank makes the same bad call. The first rank
/// of each node to make it gets InvalidArgument and fails the group (a local refusal); a rank of
/// that node that calls after it may find the group failed first and get Poisoned with that very
/// cause. Every later call is an error.
fn norm_bad_shapes(comm: &Communicator, world: &World) -> Result<String, String> {
    let config = comm.config().clone();
    let mut report = Vec::new();
    for (k, (what, key)) in [
        ("weight length not dividing the input", "whole rows"),
        ("rows not a multiple of 16 bytes", "multiple of 16 bytes"),
        ("eps negative", "eps = -"),
        ("norm_out = residual_out", "overlap"),
    ]
    .into_iter()
    .enumerate()
    {
        let fresh = world.duplicate();
        let c = build(&fresh, config.clone(), true).map_err(|e| format!("{what}: new: {e}"))?;
        c.init_device().map_err(|e| format!("{what}: init_device: {e}"))?;
        // Every rank is past init_device before any fails the group (which its init_device
        // would report otherwise).
        tpcomm::testing::barrier(world, Duration::from_secs(60)).map_err(|e| format!("{what}: barrier: {e}"))?;
        let (len, hidden, eps) = match k {
            0 => (384, 100, 1e-6), // 3 rows of 128, weight of 100
            1 => (36, 12, 1e-6),   // 3 rows of 24 bytes
            _ => (384, 128, if k == 2 { -1e-6 } else { 1e-6 }),
        };
        let input: Vec<bf16> = rank_input(0xbad + k as u64, c.rank(), len);
        let mut x = Aligned::from(&input);
        let mut r = Aligned::from(&input);
        let mut w = Aligned::from(&input[..hidden]);
        let mut y = Aligned::from(&vec![poison::<bf16>(); len]);
        let mut ro = Aligned::from(&vec![poison::<bf16>(); len]);
        let ro_ptr = if k == 3 { y.ptr() } else { ro.ptr() };
        // SAFETY: every buffer holds at least the elements the call names (weight: `hidden`).
        let res = unsafe {
            mock_all_reduce_add_rms_norm(
                &c,
                &CallOptions::default(),
                x.ptr(),
                r.ptr(),
                w.ptr(),
                hidden,
                eps,
                y.ptr(),
                ro_ptr,
                len,
            )
        };
        let mine = match &res {
            Err(Error::InvalidArgument { op, detail }) if *op == "all_reduce_add_rms_norm" && detail.contains(key) => {
                1u8
            }
            Err(Error::Poisoned { cause }) if cause.contains("invalid argument") && cause.contains(key) => 0u8,
            other => return Err(format!("{what}: expected InvalidArgument, got {other:?}")),
        };
        if count_wrong(y.as_mut(), &vec![poison::<bf16>(); len]) != 0 {
            return Err(format!("{what}: the refused call wrote its output"));
        }
        // At least the first caller of every node saw the InvalidArgument itself.
        let all = tpcomm::testing::all_gather_bytes(world, &[mine]).map_err(|e| e.to_string())?;
        let layout = c.layout();
        for node in 0..layout.nodes {
            if !(0..layout.size).any(|r| layout.rank_to_node[r] == node && all[r][0] == 1) {
                return Err(format!("{what}: no rank of node {node} got InvalidArgument ({all:?})"));
            }
        }
        // The group is failed: a good call is an error on every rank.
        let good: Vec<bf16> = rank_input(0x600d, c.rank(), 384);
        let (r, ..) = norm_once(&c, &CallOptions::default(), &good, &good, &good[..128], 1e-6, false);
        if r.is_ok() {
            return Err(format!("{what}: a good call after the refusal returned Ok"));
        }
        report.push(format!(
            "{what}: {} of {} ranks InvalidArgument",
            all.iter().filter(|b| b[0] == 1).count(),
            all.len()
        ));
    }
    Ok(report.join("; "))
}

/// The bootstrap's byte exchange with blobs of different lengths, empty ones included (an empty
/// buffer once reached MPI as an invalid pointer and aborted the job).
fn byte_exchange(world: &World) -> Result<String, String> {
    use tpcomm::testing::{all_gather_bytes, broadcast_bytes};
    let (rank, n) = (world.rank() as usize, world.size() as usize);
    let blob = |r: usize| -> Vec<u8> { (0..r * 3).map(|i| (r * 31 + i) as u8).collect() };
    let all = all_gather_bytes(world, &blob(rank)).map_err(|e| e.to_string())?;
    if all != (0..n).map(blob).collect::<Vec<_>>() {
        return Err(format!("all_gather_bytes gave {all:?}"));
    }
    let empty = all_gather_bytes(world, &[]).map_err(|e| e.to_string())?;
    if empty.len() != n || empty.iter().any(|b| !b.is_empty()) {
        return Err(format!("all_gather_bytes of nothing gave {empty:?}"));
    }
    for root in 0..n {
        for len in [0usize, 1, 1000] {
            let mut b: Vec<u8> =
                if rank == root { (0..len).map(|i| (i * 7 + root) as u8).collect() } else { vec![9; 5] };
            broadcast_bytes(world, root, &mut b).map_err(|e| e.to_string())?;
            if b != (0..len).map(|i| (i * 7 + root) as u8).collect::<Vec<u8>>() {
                return Err(format!("broadcast_bytes from {root} of {len} bytes gave {} bytes", b.len()));
            }
        }
    }
    Ok("all_gather_bytes and broadcast_bytes right for empty and unequal blobs".into())
}

/// `tune` gives every rank the same table and saves it; a new communicator loads it; a table
/// tuned for another machine is refused on every rank.
fn tune_save_and_load(world: &World, mut config: Config) -> Result<String, String> {
    use tpcomm::testing::{all_gather_bytes, barrier};
    let dir = std::path::PathBuf::from(std::env::var("TPCOMMTEST_DIR").map_err(|e| e.to_string())?);
    let file = dir.join("dispatch.txt");
    config.tune_file = Some(file.clone());
    let wait = Duration::from_secs(60);
    let comm = Communicator::new(world, config.clone()).map_err(|e| format!("new: {e}"))?;
    let tuned = comm.tune().map_err(|e| format!("tune: {e}"))?;
    let limit = tuned.host_oneshot_max_bytes() as u64;
    let all = all_gather_bytes(world, &limit.to_le_bytes()).map_err(|e| e.to_string())?;
    if all.iter().any(|l| l[..] != limit.to_le_bytes()) {
        return Err(format!("ranks ended with different tuned limits {all:?}"));
    }
    if limit != 0 && !(12..=22).any(|p| limit == 1 << p) {
        return Err(format!("tuned limit {limit} is not one of the measured sizes"));
    }
    if comm.dispatch_table().host_oneshot_max_bytes() as u64 != limit {
        return Err("the communicator does not use the tuned table".into());
    }
    // The tuned limit must route calls: one element above it goes two-shot.
    if comm.host_algo::<f32>((limit as usize + 4) / 4).map_err(|e| e.to_string())? != Algo::HostTwoShot {
        return Err("a call above the tuned limit is not two-shot".into());
    }
    drop(comm);
    barrier(world, wait).map_err(|e| e.to_string())?;
    let again = Communicator::new(world, config.clone()).map_err(|e| format!("new after tune: {e}"))?;
    if again.dispatch_table() != tuned {
        return Err(format!("loaded table {:?} differs from tuned {tuned:?}", again.dispatch_table()));
    }
    drop(again);
    barrier(world, wait).map_err(|e| e.to_string())?;
    if world.rank() == 0 {
        let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
        let other: String = text
            .lines()
            .map(|l| if l.starts_with("key ") { "key cpu=elsewhere\n".to_string() } else { format!("{l}\n") })
            .collect();
        std::fs::write(&file, other).map_err(|e| e.to_string())?;
    }
    barrier(world, wait).map_err(|e| e.to_string())?;
    match Communicator::new(world, config) {
        Err(Error::Config { expected, .. }) if expected.contains("--autotune") => {
            Ok(format!("tuned host one-shot limit {limit} B: shared, saved, loaded; a foreign table refused"))
        }
        Err(e) => Err(format!("a foreign table gave {e}, not a Config error")),
        Ok(_) => Err("a table tuned for another machine was accepted".into()),
    }
}

/// Rank 2 runs with another chunk size: every rank must refuse to build the communicator; a
/// setting that only changes one rank (logging) is fine.
fn different_config_per_rank(world: &World, mut config: Config) -> Result<String, String> {
    let mut logging = config.clone();
    logging.debug = world.rank() == 1;
    drop(Communicator::new(world, logging).map_err(|e| format!("ranks differing only in TPCOMM_DEBUG: {e}"))?);
    if world.rank() == 2 {
        config.host_chunk_bytes *= 2;
    }
    match Communicator::new(world, config) {
        Err(Error::Mismatch { detail, .. })
            if detail.contains("rank 2") && detail.contains("TPCOMM_HOST_CHUNK_BYTES") =>
        {
            Ok(format!("refused: {detail}"))
        }
        Err(e) => Err(format!("expected a Mismatch naming rank 2, got {e}")),
        Ok(_) => Err("a communicator was built with differing configurations".into()),
    }
}

/// The same 1000 values per rank, embedded at many offsets in messages of many sizes and reduced
/// by every algorithm (across chunk boundaries too), give the same bits every time: the result
/// of element i depends only on the ranks' values at i.
fn batch_invariance(comm: &Communicator) -> Result<String, String> {
    const WINDOW: usize = 1000;
    let probe: Vec<bf16> = rank_input(0xba7c, comm.rank(), WINDOW);
    let mut first: Option<Vec<bf16>> = None;
    let mut runs = 0;
    for (len, offset) in [(1000, 0), (1001, 1), (3000, 1017), (5000, 2047), (20000, 4095), (70001, 33333)] {
        for algo in [Algo::HostOneShot, Algo::HostTwoShot] {
            let mut buf: Vec<bf16> = rank_input(len as u64, comm.rank(), len);
            buf[offset..offset + WINDOW].copy_from_slice(&probe);
            comm.all_reduce_host_with(&CallOptions::algo(algo), None, &mut buf)
                .map_err(|e| format!("len {len} {algo}: {e}"))?;
            let window = buf[offset..offset + WINDOW].to_vec();
            match &first {
                None => first = Some(window),
                Some(want) if count_wrong(&window, want) == 0 => {}
                Some(want) => {
                    return Err(format!(
                        "len {len} offset {offset} {algo}: {} of {WINDOW} probe results differ",
                        count_wrong(&window, want)
                    ))
                }
            }
            runs += 1;
        }
    }
    Ok(format!("{runs} embeddings gave identical bits"))
}

/// Deterministic mode (run with `TPCOMM_DETERMINISTIC=1`): the same values per rank, embedded
/// at many offsets in messages of many sizes, in place and not, through the dispatch table's
/// choice and both host algorithms, give the reference bits of `tpcomm::verify` every time and
/// on every rank, and the whole message matches the reference too. Device calls (the CPU
/// stand-in) must stay off NCCL and match too.
fn deterministic(comm: &Communicator) -> Result<String, String> {
    if !comm.config().deterministic {
        return Err("run this case with TPCOMM_DETERMINISTIC=1".into());
    }
    comm.init_device().map_err(|e| format!("init_device: {e}"))?;
    let n = comm.size();
    let nodes = comm.layout().nodes;
    match comm.device_algo::<bf16>(32 << 20) {
        // One rank copies its input: exact, hence deterministic.
        Ok(Algo::Copy) if n == 1 => {}
        Ok(Algo::Chunked) if nodes == 1 && n > 1 => {}
        Err(Error::Unsupported { .. }) if nodes > 1 => {}
        other => return Err(format!("64 MiB of device memory on {nodes} node(s) went to {other:?}")),
    }
    let mut checks = deterministic_for::<f32>(comm, false)?;
    checks += deterministic_for::<bf16>(comm, false)?;
    if nodes == 1 {
        checks += deterministic_for::<bf16>(comm, true)?;
    }
    // Every rank reached the same count: no rank skipped a case.
    let all =
        tpcomm::testing::all_gather_bytes(&mpi::topology::SimpleCommunicator::world(), &(checks as u64).to_le_bytes())
            .map_err(|e| e.to_string())?;
    if all.iter().any(|c| c[..] != (checks as u64).to_le_bytes()) {
        return Err(format!("ranks ran different numbers of checks: {all:?}"));
    }
    Ok(format!("{checks} embeddings gave the reference bits"))
}

fn deterministic_for<T: Element>(comm: &Communicator, device: bool) -> Result<usize, String> {
    const WINDOW: usize = 777;
    const PROBE_SEED: u64 = 0xde7e;
    let (rank, n) = (comm.rank(), comm.size());
    let rank_to_node = comm.layout().rank_to_node.clone();
    // The probe's expected bits, from the reference of the plan in force (flat on one node).
    let want_probe: Vec<T> = expected_hierarchical_sum(PROBE_SEED, &rank_to_node, WINDOW);
    let probe_of = |r: usize| rank_input::<T>(PROBE_SEED, r, WINDOW);
    let message = |r: usize, len: usize, offset: usize| {
        let mut buf: Vec<T> = rank_input(0x5a17 ^ len as u64, r, len);
        buf[offset..offset + WINDOW].copy_from_slice(&probe_of(r));
        buf
    };
    let mut checks = 0;
    let cases =
        [(777, 0), (778, 1), (1000, 223), (1024, 7), (2048 + 3, 1024), (5000, 4095), (20000, 9999), (70001, 69224)];
    let host_algos = [(None, false), (None, true), (Some(Algo::HostOneShot), false), (Some(Algo::HostTwoShot), true)];
    let device_algos = [(None, false), (None, true), (Some(Algo::Chunked), false), (Some(Algo::Chunked), true)];
    for (len, offset) in cases {
        let all: Vec<Vec<T>> = (0..n).map(|r| message(r, len, offset)).collect();
        let views: Vec<&[T]> = all.iter().map(|b| &b[..]).collect();
        let want_all = tpcomm::verify::hierarchical_reference(&views, &rank_to_node);
        for (algo, in_place) in if device { device_algos } else { host_algos } {
            let input = all[rank].clone();
            let what = format!("{} len {len} offset {offset} {algo:?} in_place {in_place} device {device}", T::DTYPE);
            let opts = CallOptions { algo, ..CallOptions::default() };
            let (res, out) = reduce_once(comm, &opts, device, in_place, &input);
            res.map_err(|e| format!("{what}: {e}"))?;
            let wrong = count_wrong(&out[offset..offset + WINDOW], &want_probe);
            if wrong > 0 {
                return Err(format!("{what}: {wrong} of {WINDOW} probe elements differ from the reference"));
            }
            let wrong = count_wrong(&out, &want_all);
            if wrong > 0 {
                return Err(format!("{what}: {wrong} of {len} elements differ from the reference"));
            }
            checks += 1;
        }
    }
    Ok(checks)
}

/// The ranks of each (pretend) node agree on the length, but the nodes do not: the cross-node
/// step must report it on every rank.
fn nodes_disagree_on_length(comm: &Communicator) -> Result<String, String> {
    let len = 100 + 100 * comm.layout().node_index();
    let input: Vec<f32> = rank_input(4, comm.rank(), len);
    let mut out = vec![0.0f32; len];
    match comm.all_reduce_host(&input, &mut out) {
        Err(Error::Mismatch { detail, .. }) => Ok(format!("refused: {detail}")),
        other => Err(format!("expected Mismatch from the cross-node step, got {other:?}")),
    }
}

fn mismatched_lengths(comm: &Communicator) -> Result<String, String> {
    let len = if comm.rank() == 1 { 1000 } else { 999 };
    let input: Vec<f32> = rank_input(1, comm.rank(), len);
    let mut out = vec![0.0f32; len];
    match comm.all_reduce_host(&input, &mut out) {
        Err(Error::Mismatch { detail, .. })
            if detail.contains("1000") && detail.contains("999") && detail.contains("float") => {}
        other => return Err(format!("expected a Mismatch naming both lengths and the dtype by name, got {other:?}")),
    }
    match comm.all_reduce_host(&input, &mut out) {
        Err(Error::Poisoned { .. }) => Ok("mismatch reported, then poisoned".into()),
        other => Err(format!("expected Poisoned after the mismatch, got {other:?}")),
    }
}

/// Every call of this rank from now on must be an error, never data.
fn every_later_call_fails(comm: &Communicator, device: bool, what: &str) -> Result<(), String> {
    for k in 0..3 {
        let input: Vec<f32> = rank_input(77 + k, comm.rank(), 512);
        let r = if device {
            let mut out = Aligned::from(&vec![poison::<f32>(); 512]);
            mock_call(comm, &CallOptions::default(), Some(&input), &mut out)
        } else {
            let mut out = vec![poison::<f32>(); 512];
            comm.all_reduce_host(&input, &mut out)
        };
        if r.is_ok() {
            return Err(format!("{what}: call {k} after the fault returned Ok"));
        }
    }
    Ok(())
}

fn rank_skips_call(comm: &Communicator) -> Result<String, String> {
    let skipper = comm.size() - 1;
    let timeout = comm.config().timeout;
    let input: Vec<f32> = rank_input(2, comm.rank(), 4096);
    let mut out = vec![0.0f32; 4096];
    // One good call first, so the skipped one is not the first.
    comm.all_reduce_host(&input, &mut out).map_err(|e| format!("first call: {e}"))?;
    if comm.rank() == skipper {
        // Wait until the others gave up on the skipped call, then go on as if nothing happened:
        // this call must not pair with what they abandoned.
        std::thread::sleep(timeout * 2);
        every_later_call_fails(comm, false, "the skipping rank")?;
        return Ok("skipped the second call; every later call was an error".into());
    }
    let start = Instant::now();
    let got = comm.all_reduce_host(&input, &mut out);
    let took = start.elapsed();
    let named = |cause: &str| cause.contains(&format!("rank {skipper}"));
    let fine = match &got {
        Err(Error::PeerTimeout { peer: Some(p), .. }) if comm.layout().nodes == 1 => *p == skipper,
        // Another rank timed out first and failed the group; its cause names the skipper.
        Err(Error::Poisoned { cause }) => named(cause) || comm.layout().nodes > 1,
        // A rank on another pretend node waits in the cross-node leg or on a node peer that
        // itself timed out; it must still end in an error, not hang.
        Err(Error::PeerTimeout { .. }) => comm.layout().nodes > 1,
        _ => false,
    };
    if !fine || took > timeout * 3 {
        return Err(format!(
            "expected PeerTimeout naming rank {skipper} within the timeout, got {got:?} after {took:?}"
        ));
    }
    every_later_call_fails(comm, false, "a waiting rank")?;
    Ok(format!("{got:?} after {:.2} s; every later call an error", took.as_secs_f64()))
}

/// Rank 0 passes an output one element longer: it gets InvalidArgument, fails the group at
/// once, and the peers stop waiting without waiting out the (long) timeout; every later call on
/// every rank is an error.
fn input_output_lengths_differ(comm: &Communicator) -> Result<String, String> {
    let input: Vec<f32> = rank_input(3, comm.rank(), 64);
    let mut out = vec![0.0f32; if comm.rank() == 0 { 65 } else { 64 }];
    let start = Instant::now();
    let r = comm.all_reduce_host(&input, &mut out);
    let took = start.elapsed();
    let fine = match (comm.rank(), &r) {
        (0, Err(Error::InvalidArgument { .. })) => true,
        (_, Err(Error::Poisoned { cause })) => cause.contains("rank 0") && took < comm.config().timeout / 4,
        _ => false,
    };
    if !fine {
        return Err(format!("unexpected {r:?} after {took:?}"));
    }
    let mut ok_out = vec![0.0f32; 64];
    if comm.all_reduce_host(&input, &mut ok_out).is_ok() {
        return Err("a correct call after the bad argument returned Ok".into());
    }
    Ok(format!("{r:?} after {:.3} s, then poisoned", took.as_secs_f64()))
}

/// A rank that never arrives at `Communicator::new`: the others get PeerTimeout within the
/// timeout (set-up waits are bounded), and the late rank, arriving after they gave up, gets an
/// error too instead of blocking.
fn setup_rank_never_arrives(world: &World, config: Config) -> Result<String, String> {
    let late = world.size() as usize - 1;
    let timeout = config.timeout;
    if world.rank() as usize == late {
        std::thread::sleep(timeout * 3);
        return match Communicator::new(world, config) {
            Err(e @ (Error::PeerTimeout { .. } | Error::Mismatch { .. })) => Ok(format!("late arrival refused: {e}")),
            Err(e) => Err(format!("late arrival: unexpected {e}")),
            Ok(_) => Err("late arrival got a communicator".into()),
        };
    }
    let start = Instant::now();
    let r = Communicator::new(world, config);
    let took = start.elapsed();
    match r {
        Err(Error::PeerTimeout { .. }) if took < timeout * 3 => Ok(format!("PeerTimeout after {took:?}")),
        Err(e) => Err(format!("expected PeerTimeout within the timeout, got {e} after {took:?}")),
        Ok(_) => Err("a communicator was built without every rank".into()),
    }
}

/// One rank aborts while the others wait for it; every waiting call ends at once with Poisoned
/// naming the abort, every later call is an error, and the group rebuilt from a fresh MPI
/// communicator gives exact results.
fn abort_and_rebuild(world: &World, config: Config) -> Result<String, String> {
    let timeout = config.timeout;
    for mock in [false, true] {
        let comm = build(world, config.clone(), mock).map_err(|e| format!("new: {e}"))?;
        if mock {
            comm.init_device().map_err(|e| format!("init_device: {e}"))?;
        }
        let input: Vec<f32> = rank_input(5, comm.rank(), 2048);
        let call = |c: &Communicator| -> tpcomm::Result<Vec<f32>> {
            if mock {
                let mut out = Aligned::from(&vec![poison::<f32>(); 2048]);
                mock_call(c, &CallOptions::default(), Some(&input), &mut out).map(|()| out.as_mut().to_vec())
            } else {
                let mut out = vec![poison::<f32>(); 2048];
                c.all_reduce_host(&input, &mut out).map(|()| out)
            }
        };
        call(&comm).map_err(|e| format!("first call: {e}"))?;
        if comm.rank() == 0 {
            // The others are already waiting (host) or will find the fault at their call.
            std::thread::sleep(Duration::from_millis(200));
            comm.abort_handle().abort();
        } else {
            let start = Instant::now();
            match call(&comm) {
                Err(Error::Poisoned { cause }) if cause.contains("abort") && start.elapsed() < timeout / 2 => {}
                other => {
                    return Err(format!(
                        "mock {mock}: a call pending on an aborted group gave {other:?} after {:?}",
                        start.elapsed()
                    ))
                }
            }
        }
        every_later_call_fails(&comm, mock, "after abort")?;
        drop(comm);
        // The recipe: a fresh MPI communicator, a new tpcomm communicator over it.
        let fresh = world.duplicate();
        let comm = build(&fresh, config.clone(), mock).map_err(|e| format!("rebuild: {e}"))?;
        if mock {
            comm.init_device().map_err(|e| format!("rebuild init_device: {e}"))?;
        }
        let got = call(&comm).map_err(|e| format!("after rebuild: {e}"))?;
        let want: Vec<f32> = expected_hierarchical_sum(5, &comm.layout().rank_to_node, 2048);
        if count_wrong(&got, &want) > 0 {
            return Err(format!("mock {mock}: the rebuilt group gave wrong bits"));
        }
    }
    Ok("abort stopped every pending call; rebuilt groups exact (host and device layer)".into())
}

/// The randomized fault suite: rounds of random calls (host memory, or device memory through
/// the CPU stand-in; random sizes and forced algorithms), each with one fault at a random call
/// on a random rank: a skipped call, a bad argument, a different call, a late arrival, or an
/// abort. Every call before the fault must be exact; at and after it every call of every rank
/// must be an error, never data; then the group is rebuilt from a fresh MPI communicator and
/// must be exact again. The seed is the same on every rank, so every rank knows the script.
fn fault_suite(world: &World, config: Config) -> Result<String, String> {
    let n = world.size() as usize;
    let timeout = config.timeout;
    let mut rng = SplitMix64::new(0xfa17, n as u64);
    let kinds = ["skip", "bad argument", "different length", "late", "abort"];
    let mut report = Vec::new();
    // Every kind of fault on host and on device memory; the victim and the call are random.
    for round in 0..2 * kinds.len() as u64 {
        let device = round % 2 == 1;
        let kind = kinds[round as usize / 2];
        let victim = rng.below(n as u64) as usize;
        let at = 1 + rng.below(3) as usize;
        let tag = format!("round {round} ({kind} by rank {victim} at call {at}, device {device})");
        let fresh = world.duplicate();
        let comm = build(&fresh, config.clone(), device).map_err(|e| format!("{tag}: new: {e}"))?;
        if device {
            comm.init_device().map_err(|e| format!("{tag}: init_device: {e}"))?;
        }
        let me = comm.rank();
        let nodes = comm.layout().rank_to_node.clone();
        let call = |seed: u64, len: usize, forced: Option<Algo>| -> tpcomm::Result<Vec<f32>> {
            let input: Vec<f32> = rank_input(seed, me, len);
            if device {
                let mut out = Aligned::from(&vec![poison::<f32>(); len]);
                mock_call(&comm, &CallOptions::default(), Some(&input), &mut out).map(|()| out.as_mut().to_vec())
            } else {
                let mut out = vec![poison::<f32>(); len];
                comm.all_reduce_host_with(
                    &CallOptions { algo: forced, ..CallOptions::default() },
                    Some(&input),
                    &mut out,
                )
                .map(|()| out)
            }
        };
        for k in 0..=at {
            let len = 1 + rng.below(20_000) as usize;
            let seed = rng.next_u64();
            let forced = [None, Some(Algo::HostOneShot), Some(Algo::HostTwoShot)][rng.below(3) as usize];
            if k < at {
                let got = match call(seed, len, forced) {
                    // An abort stops every call in flight: a peer may still be finishing the call
                    // before it when the victim, done with it, aborts.
                    Err(Error::Poisoned { cause }) if kind == "abort" && k + 1 == at && cause.contains("abort") => {
                        break
                    }
                    other => other.map_err(|e| format!("{tag}: call {k} before the fault: {e}"))?,
                };
                if count_wrong(&got, &expected_hierarchical_sum(seed, &nodes, len)) > 0 {
                    return Err(format!("{tag}: call {k} before the fault: wrong data"));
                }
                continue;
            }
            let result = match (me == victim, kind) {
                (false, _) => call(seed, len, forced).map(|_| ()),
                (true, "skip") => {
                    std::thread::sleep(timeout * 2);
                    continue;
                }
                (true, "abort") => {
                    comm.abort();
                    continue;
                }
                (true, "late") => {
                    std::thread::sleep(timeout * 2);
                    call(seed, len, forced).map(|_| ())
                }
                (true, "different length") => call(seed, len + 1, forced).map(|_| ()),
                (true, _) if device => {
                    // A misaligned input on this rank only: its plan differs from the peers'.
                    let input: Vec<f32> = rank_input(seed, me, len + 1);
                    let mut inp = Aligned::from(&input);
                    let mut out = Aligned::from(&vec![poison::<f32>(); len]);
                    // SAFETY: `inp` holds len + 1 elements, so len of them from element 1.
                    unsafe { mock_all_reduce(&comm, &CallOptions::default(), inp.ptr().add(1), out.ptr(), len) }
                }
                (true, _) => {
                    let input: Vec<f32> = rank_input(seed, me, len);
                    comm.all_reduce_host(&input, &mut vec![0.0f32; len + 1])
                }
            };
            if result.is_ok() {
                return Err(format!("{tag}: the call at the fault returned Ok on rank {me}"));
            }
        }
        every_later_call_fails(&comm, device, &tag)?;
        drop(comm);
        // Rebuilt from a fresh MPI communicator: exact again.
        let fresh = world.duplicate();
        let comm = build(&fresh, config.clone(), device).map_err(|e| format!("{tag}: rebuild: {e}"))?;
        if device {
            comm.init_device().map_err(|e| format!("{tag}: rebuild init_device: {e}"))?;
        }
        let input: Vec<f32> = rank_input(round, me, 3000);
        let got = if device {
            let mut out = Aligned::from(&vec![poison::<f32>(); 3000]);
            mock_call(&comm, &CallOptions::default(), Some(&input), &mut out).map(|()| out.as_mut().to_vec())
        } else {
            let mut out = vec![poison::<f32>(); 3000];
            comm.all_reduce_host(&input, &mut out).map(|()| out)
        }
        .map_err(|e| format!("{tag}: after rebuild: {e}"))?;
        if count_wrong(&got, &expected_hierarchical_sum::<f32>(round, &nodes, 3000)) > 0 {
            return Err(format!("{tag}: the rebuilt group gave wrong bits"));
        }
        report.push(format!("{kind}@{at}/r{victim}{}", if device { "/dev" } else { "" }));
    }
    Ok(format!("faults {}: every call at and after a fault an error, every rebuilt group exact", report.join(" ")))
}
