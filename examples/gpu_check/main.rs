//! Self-checking GPU test of tpcomm's device paths. Run under mpirun:
//!
//! ```text
//! mpirun -np 4 target/release/examples/gpu_check [--quick] [--topology] [--sabotage] [--only STEP[,STEP...]]
//! ```
//!
//! Objective: prove that every device path gives `tpcomm::verify::reference_sum`'s bits on
//! every rank, that an engine's own flow works (its capture under a registration, eager calls
//! that never wait, several streams, communicators built and dropped again and again), and that
//! bad calls fail with typed errors on every rank instead of hanging or handing back data.
//!
//! What it checks, for f32, f16 and bf16, sizes from 1 element to 64 MiB (odd counts and tails
//! that are not a whole 16-byte vector included), every IPC algorithm forced:
//! - registered (input from `alloc_shared`), staged (input from cudarc's allocator) and
//!   graph-captured calls (input from `alloc_device`, read in place by the graph, or from
//!   cudarc's allocator, staged inside the graph), in place and out of place;
//! - graph replays with fresh inputs between replays (`GPU_CHECK_REPLAYS` at one small size),
//!   and a graph mixing packet, Lamport and one-shot calls;
//! - the engine's flow (`engine.rs`): 20,000 calls captured by the application's own capture
//!   under registrations and replayed; captures far beyond the rank-data table's rows, dropped;
//!   a capture without registration refused; eager loops of 1,000 calls with no sync between,
//!   on one stream and two; 200 communicators built, finalized and dropped with GPU memory and
//!   file descriptors stable;
//! - refusals every rank makes alike (oversize forced calls, f64, `copy` with several ranks),
//!   after which the communicator still works; local bad arguments (misaligned, mismatched,
//!   unregistered), which fail the group at once on every rank;
//! - a rank that skips a call, plain or fused with the norm (the others: `PeerTimeout` from
//!   `synchronize`; the skipper's next call: an error, never its peers' abandoned data), ranks capturing different numbers of calls
//!   and ranks passing different lengths (`Error::Mismatch`);
//! - NCCL: at world size 1, forced NCCL calls give the reference bits; with ranks sharing a GPU,
//!   forcing NCCL gives `Error::Unsupported` naming the duplicate GPU on every rank; several
//!   ranks on their own GPUs are reported as skipped (NCCL's order is not rank order);
//! - deterministic mode (1 MiB custom limit): messages of 3-5 MiB go chunked and give the
//!   rank-order reference bits, and a probe embedded anywhere gives the same bits;
//! - the fused allreduce + residual add + RMSNorm (`norm.rs`): f32, f16, bf16, hidden 128 to
//!   8192 (and 4104), 1 to 4096 tokens, fused, split and the dispatch's choice, registered and
//!   staged inputs, in place and not, eager and graph replays of fresh data: the host
//!   reference's bits for both outputs; ranks passing other row lengths fail;
//! - quick (`quick.rs`): every codec, dtype and size to 64 MiB, eager and graph (1,000 replays
//!   of fresh inputs at one size), in place and not: the host model's bits, within the bound,
//!   the same bytes on every rank; NaN/Inf poison only their groups; the dispatch picks the
//!   codec when `TPCOMM_QUICK` names it; a skipped quick call and mismatched lengths fail.
//!
//! Every rank's input is a pure function of (seed, rank, index), so every rank computes the
//! reference over all ranks' inputs. Outputs, and 64 elements after them, are poisoned (NaN)
//! before each call, and the elements after must still hold the poison; inputs are never zero.
//! Prints `N passed, M failed, K skipped` (summed over ranks) and exits non-zero on a failure.
//! `--sabotage` corrupts one element of every result before it is checked: that run must fail,
//! which proves the checks can.

// The checks are written against cudarc's API: a ROCm build compiles `main` below only, which
// says so and exits with status 2 (nothing checked, never a pass).
#![cfg_attr(feature = "rocm", allow(unused_imports, dead_code))]

#[cfg(not(feature = "rocm"))]
mod cases;
#[cfg(not(feature = "rocm"))]
mod engine;
#[cfg(not(feature = "rocm"))]
mod harness;
#[cfg(not(feature = "rocm"))]
mod norm;
#[cfg(not(feature = "rocm"))]
mod quick;

/// A ROCm build: no GPU check is written for HIP yet.
#[cfg(feature = "rocm")]
fn main() {
    eprintln!(
        "gpu_check: the GPU checks are written against cudarc (CUDA builds); this ROCm build checked nothing \
         (tpcomm's backends compile against HIP but have not run on AMD hardware)"
    );
    std::process::exit(2);
}

use anyhow::{anyhow, Result};
#[cfg(not(feature = "rocm"))]
use harness::{Ctx, Tally};
use mpi::collective::SystemOperation;
use mpi::topology::Communicator as _;
use mpi::traits::*;
use std::time::Instant;
use tpcomm::{bf16, f16, Algo, Communicator, Config};

/// One named part of the check.
#[cfg(not(feature = "rocm"))]
type Step<'a> = dyn FnMut(&mut Ctx, &mut Tally) -> Result<()> + 'a;

#[cfg(not(feature = "rocm"))]
fn main() -> Result<()> {
    let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI initialised twice"))?;
    let world = universe.world();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sabotage = args.iter().any(|a| a == "--sabotage");
    // `--only STEP[,STEP...]` runs those steps (and, for quick alone, its fault checks): for focused runs; the
    // steps left out are neither passed nor counted.
    let only: Option<String> = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1).cloned());
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s == name));
    let replays: usize = std::env::var("GPU_CHECK_REPLAYS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // The quick backend is built (calls force its codecs) but never chosen unforced, so every
    // other check sees the exact algorithms; `quick::dispatch_picks_quick` checks the choice.
    let env = Config::from_env()?;
    let config = Config {
        quick: env.quick.or(Some(tpcomm::quant::Codec::Int8)),
        quick_min_bytes: env.quick_min_bytes.or(Some(usize::MAX)),
        ..env
    };
    if args.iter().any(|a| a == "--topology") {
        // The node's GPUs and links as tpcomm sees them, then nothing else.
        let comm = Communicator::new(&world, config.clone())?;
        comm.init_device()?;
        let report = comm.topology_report()?;
        if world.rank() == 0 {
            println!("{}\n{report}", comm.layout().summary());
        }
        return Ok(());
    }
    let rank = world.rank() as usize;
    let n = world.size() as usize;
    let mut tally = Tally { rank, passed: 0, failed: 0, skipped: 0 };
    let t_start = Instant::now();
    let ordinal;
    {
        let comm = Communicator::new(&world, config.clone())?;
        comm.init_device()?;
        let ctx = comm.cuda_context()?;
        ordinal = ctx.ordinal();
        // One stream for everything: graph capture must not wait on other streams' events.
        // SAFETY: all work of this program is ordered on `stream` or synchronised explicitly.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        if rank == 0 {
            let nv = tpcomm::testing::nvrtc_version().unwrap_or((0, 0));
            let cc = ctx.compute_capability()?;
            println!(
                "gpu_check: {n} ranks, {} ({}), sm_{}{}, NVRTC {}.{}, kernels as CUBIN, max {} bytes",
                ctx.name()?,
                ctx.ordinal(),
                cc.0,
                cc.1,
                nv.0,
                nv.1,
                config.custom_max_bytes
            );
        }
        let max_bytes = config.custom_max_bytes;
        let mut c = Ctx { comm: &comm, stream, n, rank, seed: 1, sabotage };
        let captured = if quick { 2_000 } else { 20_000 };
        let steps: [(&str, &mut Step); 16] = [
            ("f32", &mut |c, t| cases::run_dtype::<f32>(c, t, max_bytes, quick)),
            ("f16", &mut |c, t| cases::run_dtype::<f16>(c, t, max_bytes, quick)),
            ("bf16", &mut |c, t| cases::run_dtype::<bf16>(c, t, max_bytes, quick)),
            ("refusals", &mut |c, t| cases::consistent_refusals(c, t, max_bytes)),
            ("replays", &mut |c, t| cases::many_replays(c, t, replays)),
            ("mixed graph", &mut |c, t| cases::mixed_graph(c, t, (replays / 10).max(10))),
            ("own capture", &mut |c, t| engine::own_capture(c, t, 8, captured / 8, 2)),
            ("rows come back", &mut |c, t| engine::rows_come_back(c, t, if quick { 300 } else { 3_000 }, 48)),
            ("unregistered capture", &mut |c, t| engine::unregistered_capture_refused(c, t)),
            ("eager loops", &mut |c, t| {
                engine::eager_loop(c, t, 1_000, 2_048, None, false)?;
                engine::eager_loop(c, t, 1_000, 2_048, None, true)?;
                engine::eager_loop(c, t, 200, 128 << 10, Some(Algo::OneShot), false)?;
                engine::eager_loop(c, t, 50, MIB_BF16, Some(Algo::TwoShot), true)
            }),
            ("nccl", &mut |c, t| cases::nccl_checks(c, t, &world, &config)),
            ("deterministic", &mut |c, t| cases::deterministic_checks(c, t, &world, &config)),
            ("beyond staging", &mut |c, t| cases::beyond_staging_checks(c, t, &world, &config)),
            ("norm", &mut |c, t| norm::norm_checks(c, t, quick)),
            ("quick", &mut |c, t| quick::quick_checks(c, &world, &config, t, quick, if quick { 50 } else { 1_000 })),
            ("flag floor", &mut |c, _| {
                Ok(c.comm.exchange_flags(&c.stream).and_then(|()| c.comm.synchronize(&c.stream))?)
            }),
        ];
        for (name, step) in steps {
            if !wanted(name) {
                continue;
            }
            let t0 = Instant::now();
            let r = step(&mut c, &mut tally);
            tally.step(name, r);
            if rank == 0 {
                println!("step {name}: {:.1} s", t0.elapsed().as_secs_f64());
            }
        }
        comm.finalize()?;
    }
    let exact = [Algo::OneShot, Algo::TwoShot, Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport];
    let faults = |quick_algo: Algo| -> Vec<Algo> {
        match only.as_deref() {
            Some("quick") => vec![quick_algo],
            Some(_) => vec![],
            None => exact.iter().copied().chain([quick_algo]).collect(),
        }
    };
    if n > 1 {
        for algo in faults(Algo::QuickInt8) {
            let r = cases::skipped_call(&world, &config, algo, cases::SkipForm::OutOfPlace, &mut tally);
            tally.step(&format!("timeout ({algo})"), r);
        }
        if only.is_none() {
            let r = cases::skipped_call(&world, &config, Algo::TwoShot, cases::SkipForm::InPlaceRegistered, &mut tally);
            tally.step("timeout (twoshot, in place, registered)", r);
        }
        if only.is_none() {
            let r = cases::local_bad_arguments(&world, &config, &mut tally);
            tally.step("local bad arguments", r);
            let r = cases::capture_mismatch(&world, &config, &mut tally);
            tally.step("capture mismatch", r);
        }
        for algo in faults(Algo::QuickInt4) {
            let r = cases::length_mismatch(&world, &config, algo, &mut tally);
            tally.step(&format!("length mismatch ({algo})"), r);
        }
        if only.is_none() || only.as_deref() == Some("norm") {
            let r = norm::hidden_mismatch(&world, &config, &mut tally);
            tally.step("norm: hidden mismatch", r);
            // A rank skips a fused call, of either fused kernel.
            for algo in [Algo::OneShot, Algo::TwoShot] {
                let r = cases::skipped_call(&world, &config, algo, cases::SkipForm::FusedNorm, &mut tally);
                tally.step(&format!("timeout ({algo} + RMSNorm fused)"), r);
            }
        }
        if only.is_none() {
            for case in 0..4 {
                let r = cases::layout_mismatch(&world, &config, case, &mut tally);
                tally.step(&format!("layout mismatch {case}"), r);
            }
        }
    }
    if wanted("lifecycle") {
        let r = engine::lifecycle(&world, &config, &mut tally, ordinal, if quick { 20 } else { 200 });
        tally.step("lifecycle", r);
    }
    let mine = [tally.passed as u64, tally.failed as u64, tally.skipped as u64];
    let mut sum = [0u64; 3];
    world.all_reduce_into(&mine[..], &mut sum[..], SystemOperation::sum());
    if rank == 0 {
        println!(
            "gpu_check {n} ranks: {} passed, {} failed, {} skipped ({:.1} s)",
            sum[0],
            sum[1],
            sum[2],
            t_start.elapsed().as_secs_f64()
        );
    }
    if sum[1] > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// One MiB of bf16, in elements.
const MIB_BF16: usize = 1 << 19;
