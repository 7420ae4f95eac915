//! # allreduce_perf: the nccl-tests `all_reduce_perf` of tpcomm
//!
//! **Objective**: time allreduce over a sweep of message sizes and check every result, printing
//! the table nccl-tests prints (time, algorithm bandwidth, bus bandwidth = algbw * 2(n-1)/n,
//! wrong elements), plus `MPI_Allreduce` timed in the same run for comparison. The last column
//! names the dispatch's algorithm, `out|in` where it serves in-place calls otherwise.
//!
//! **Usage**: `mpirun -n 4 target/release/examples/allreduce_perf -b 8 -e 64M -f 2`
//!
//! Flags (nccl-tests spelling): `-b` min bytes, `-e` max bytes, `-f` step factor, `-n` iterations,
//! `-w` warm-up iterations, `-d` datatype (float, double, half, bfloat16), `-c` check (0/1).
//! `-G N` captures N calls in one CUDA graph and times its replays (device memory only).
//! tpcomm's own: `--memory device|host` (device where a GPU is visible, else host), `--algo NAME`
//! forces an algorithm (`auto` = dispatch table), `--compare mpi|nccl|none`, `--show-dispatch`,
//! `--show-config`, `--autotune` (time the algorithms first and move the dispatch thresholds to the
//! measured crossovers; saved to `TPCOMM_TUNE_FILE` when set).
//!
//! `--floor` (device memory): replace the HBM floor columns by the flag-exchange floor, the time
//! of one flag sent to and received from every peer (a packet call of no data; the least any
//! cross-rank call can take), measured in the same run and mode, and each time as a multiple of it.
//! `--reference FILE` (device memory): replace them by a reference's time for the same rank count
//! and size, from a CSV with `ranks` and `bytes` columns and time columns in microseconds (the
//! faster of the columns ending `_graph_us` with `-G`, `_eager_us` without), and `ref/tp`, the
//! reference over the faster of tpcomm's out-of-place and in-place times (above 1: tpcomm is
//! faster). `../shared/bench/*.csv` holds SGLang's figures in that form.
//!
//! `--quick CODEC` (device memory): time the quantized allreduce with that codec, and beside it
//! tpcomm's exact path for the same call (two-shot, chunked above `TPCOMM_CUSTOM_MAX_BYTES`)
//! timed the same way; `#wrong` counts elements whose bits differ from the host model of the
//! codec (`tpcomm::quant::quick_reference`) or lie outside its bound, and the error columns give
//! the measured max abs error, max error relative to the group's magnitude and RMS relative
//! error against the exact sum (out of place).
//!
//! `--fused-norm HIDDEN` (device memory): time `all_reduce_add_rms_norm` on rows of HIDDEN
//! elements for 1 to 4096 tokens (as far as `-e` allows), fused (`--algo oneshot|twoshot` picks
//! the fused kernel; one-shot by default) and split (the dispatch's allreduce, then tpcomm's norm
//! kernel), out of place (input and norm_out registered) and in place (the engine's form), with
//! the ratio split / fused (above 1: fusing wins) and what the dispatch runs for those buffers
//! (one more call of each form); `#wrong` counts elements of either output whose bits differ
//! from `tpcomm::verify::add_rms_norm_reference`, for both paths.
//!
//! Eager mode (no `-G`) times `-n` calls enqueued back to back and waited for once (what an engine
//! sees: the host never waits per call); `--eager-sync` waits for every call instead (launch,
//! wait, report), the figure before calls became enqueue-only.
//!
//! On device memory the MPI column is replaced by the HBM floor: the bytes the algorithm must
//! move through the memory of a GPU shared by all ranks (`Algo::hbm_floor_bytes`: one-shot
//! n(n+1)S, two-shot (3n+1)S, LL packets n(4n-2)S, Lamport n(3n-1)S for n ranks and S bytes) over
//! the device-to-device copy bandwidth measured at start, and `floor%`, the floor over the
//! measured time. On one GPU per rank the floor is only a lower bound.
//! With `--compare nccl` (device memory) they are replaced by NCCL's time for the same call,
//! timed in the same run the same way (eager or `-G` graphs) through a second communicator, and
//! `ratio` = NCCL time / tpcomm time (above 1: tpcomm is faster). Where NCCL cannot run (ranks
//! sharing a GPU, no libnccl) the reason is printed once and the columns read `n/a`.
//!
//! Times are the median over iterations of each rank's per-call time, then the maximum over
//! ranks. `#wrong` counts elements whose bits differ from the exact rank-order sum, over all
//! ranks (for NCCL and the hierarchy over several ranks, whose order of addition differs: elements
//! farther from the exact sum than any order of addition explains, on inputs of magnitude 1..2,
//! `tpcomm::verify::count_outside_order_tolerance`); the program exits non-zero if any is wrong.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use std::io::Write;
use std::time::Instant;
use tpcomm::verify::{count_wrong, expected_hierarchical_sum, fill_rank_input, poison};
use tpcomm::{bf16, f16, Algo, CallOptions, Communicator, Config, DType, Element};

struct Options {
    min_bytes: usize,
    max_bytes: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    dtype: DType,
    check: bool,
    algo: Option<Algo>,
    compare_mpi: bool,
    /// Time NCCL beside tpcomm (device memory).
    compare_nccl: bool,
    show_dispatch: bool,
    show_config: bool,
    /// Run `Communicator::tune` before the sweep.
    tune: bool,
    /// Device memory (the GPU path) instead of host memory.
    device: bool,
    /// Calls captured per CUDA graph (0 = eager launches).
    graph_calls: usize,
    /// Show the flag-exchange floor instead of the HBM floor.
    floor: bool,
    /// Eager calls wait for each call (the blocking method) instead of a loop waited once.
    eager_sync: bool,
    /// Reference times: (ranks, bytes) -> microseconds, the faster of the columns for the mode.
    reference: Option<Vec<(usize, usize, f64)>>,
    /// Time this quick codec (device memory) beside tpcomm's exact path, with error columns.
    quick: Option<tpcomm::quant::Codec>,
    /// Sweep `all_reduce_add_rms_norm` over token counts for rows of this many elements.
    fused_norm: Option<usize>,
}

const USAGE: &str = "usage: allreduce_perf [-b MINBYTES] [-e MAXBYTES] [-f FACTOR] [-n ITERS] [-w WARMUP] \
[-d float|double|half|bfloat16] [-c 0|1] [-G CALLS_PER_GRAPH] [--memory device|host] [--algo NAME|auto] \
[--compare mpi|nccl|none] [--show-dispatch] [--show-config] [--autotune] [--floor] [--eager-sync]
[--reference FILE.csv] [--quick fp8|int8|int6|int4] [--fused-norm HIDDEN]
sizes take K, M, G suffixes; run under mpirun";

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().map(|d| d * mult).map_err(|_| format!("bad size {s:?}"))
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        min_bytes: 8,
        max_bytes: 64 << 20,
        factor: 2,
        iters: 20,
        warmup: 5,
        dtype: DType::F32,
        check: true,
        algo: None,
        compare_mpi: true,
        compare_nccl: false,
        show_dispatch: false,
        show_config: false,
        tune: false,
        device: tpcomm::cuda_device_count() > 0,
        graph_calls: 0,
        floor: false,
        eager_sync: false,
        reference: None,
        quick: None,
        fused_norm: None,
    };
    let mut reference_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "-b" | "--minbytes" => o.min_bytes = parse_bytes(&value()?)?,
            "-e" | "--maxbytes" => o.max_bytes = parse_bytes(&value()?)?,
            "-f" | "--stepfactor" => o.factor = value()?.parse().map_err(|_| "bad -f")?,
            "-n" | "--iters" => o.iters = value()?.parse().map_err(|_| "bad -n")?,
            "-w" | "--warmup_iters" => o.warmup = value()?.parse().map_err(|_| "bad -w")?,
            "-d" | "--datatype" => o.dtype = value()?.parse()?,
            "-c" | "--check" => o.check = value()? != "0",
            "--algo" => {
                o.algo = match value()?.as_str() {
                    "auto" => None,
                    name => Some(name.parse().map_err(|e| format!("--algo: {e}"))?),
                }
            }
            "--compare" => {
                (o.compare_mpi, o.compare_nccl) = match value()?.as_str() {
                    "mpi" => (true, false),
                    "nccl" => (false, true),
                    "none" => (false, false),
                    other => return Err(format!("--compare {other}: expected mpi, nccl or none")),
                }
            }
            "-G" | "--cudagraph" => o.graph_calls = value()?.parse().map_err(|_| "bad -G")?,
            "--memory" => {
                o.device = match value()?.as_str() {
                    "device" => true,
                    "host" => false,
                    other => return Err(format!("--memory {other}: expected device or host")),
                }
            }
            "--show-dispatch" => o.show_dispatch = true,
            "--show-config" => o.show_config = true,
            "--autotune" => o.tune = true,
            "--floor" => o.floor = true,
            "--eager-sync" => o.eager_sync = true,
            "--reference" => reference_file = Some(value()?),
            "--quick" => o.quick = Some(value()?.parse().map_err(|e| format!("--quick: {e}"))?),
            "--fused-norm" => o.fused_norm = Some(value()?.parse().map_err(|_| "bad --fused-norm")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if o.quick.is_some() && (!o.device || o.algo.is_some() || o.compare_nccl) {
        return Err(format!(
            "--quick times device memory against the exact path: no --algo, no --compare nccl\n{USAGE}"
        ));
    }
    if o.fused_norm.is_some() && (!o.device || o.quick.is_some() || o.dtype == DType::F64) {
        return Err(format!("--fused-norm times device memory of float, half or bfloat16; no --quick\n{USAGE}"));
    }
    if o.compare_nccl && !o.device {
        return Err(format!("--compare nccl times device memory; add --memory device\n{USAGE}"));
    }
    if o.factor < 2 || o.iters == 0 || o.min_bytes > o.max_bytes {
        return Err(format!("need -f >= 2, -n >= 1 and -b <= -e\n{USAGE}"));
    }
    if let Some(file) = reference_file {
        let suffix = if o.graph_calls > 0 { "_graph_us" } else { "_eager_us" };
        o.reference = Some(read_reference(&file, suffix)?);
    }
    Ok(o)
}

/// Rows of a reference CSV (`#` lines are comments): `(ranks, bytes, fastest time in us)` over the
/// columns whose names end with `suffix`; `na` cells are skipped.
fn read_reference(file: &str, suffix: &str) -> Result<Vec<(usize, usize, f64)>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("--reference {file}: {e}"))?;
    let mut lines = text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or(format!("--reference {file}: no header"))?.split(',').collect();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (ranks, bytes) = match (col("ranks"), col("bytes")) {
        (Some(r), Some(b)) => (r, b),
        _ => return Err(format!("--reference {file}: needs ranks and bytes columns")),
    };
    let times: Vec<usize> = (0..header.len()).filter(|&i| header[i].trim().ends_with(suffix)).collect();
    if times.is_empty() {
        return Err(format!("--reference {file}: no column ending in {suffix}"));
    }
    let mut rows = Vec::new();
    for line in lines {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |i: usize| cells.get(i).and_then(|c| c.parse::<f64>().ok());
        let best = times.iter().filter_map(|&i| num(i)).fold(f64::INFINITY, f64::min);
        if let (Some(r), Some(b), true) = (num(ranks), num(bytes), best.is_finite()) {
            rows.push((r as usize, b as usize, best));
        }
    }
    Ok(rows)
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let root = world.rank() == 0;
    let fail = |msg: String| -> ! {
        if root {
            eprintln!("allreduce_perf: {msg}");
        }
        std::process::exit(2)
    };
    let opts = parse_args().unwrap_or_else(|e| fail(e));
    let mut config = Config::from_env().unwrap_or_else(|e| fail(e.to_string()));
    if let (Some(codec), None) = (opts.quick, config.quick) {
        // Build the quick backend; the sweep forces the codec per call.
        config.quick = Some(codec);
    }
    let comm = Communicator::new(&world, config.clone()).unwrap_or_else(|e| fail(e.to_string()));
    if opts.device {
        comm.init_device().unwrap_or_else(|e| fail(format!("init_device: {e}")));
    }
    // NCCL runs on a communicator of its own, so a failing NCCL never disturbs tpcomm's sweep.
    let nccl_comm = opts.compare_nccl.then(|| {
        let c = Communicator::new(&world, config).unwrap_or_else(|e| fail(e.to_string()));
        c.init_device().unwrap_or_else(|e| fail(format!("init_device: {e}")));
        c
    });
    if opts.tune {
        let table = comm.tune().unwrap_or_else(|e| fail(format!("tune: {e}")));
        if root {
            print!("# Tuned dispatch table\n{table}");
        }
    }
    let wrong = match (opts.device, opts.dtype) {
        (false, DType::F32) => run::<f32>(&comm, &world, &opts, Some(mpi_f32)),
        (false, DType::F64) => run::<f64>(&comm, &world, &opts, Some(mpi_f64)),
        (false, DType::F16) => run::<f16>(&comm, &world, &opts, None),
        (false, DType::BF16) => run::<bf16>(&comm, &world, &opts, None),
        (true, DType::F32) if opts.fused_norm.is_some() => device::run_norm::<f32>(&comm, &world, &opts),
        (true, DType::F16) if opts.fused_norm.is_some() => device::run_norm::<f16>(&comm, &world, &opts),
        (true, DType::BF16) if opts.fused_norm.is_some() => device::run_norm::<bf16>(&comm, &world, &opts),
        (true, DType::F32) => device::run::<f32>(&comm, nccl_comm.as_ref(), &world, &opts),
        (true, DType::F16) => device::run::<f16>(&comm, nccl_comm.as_ref(), &world, &opts),
        (true, DType::BF16) => device::run::<bf16>(&comm, nccl_comm.as_ref(), &world, &opts),
        (true, DType::F64) => fail("device memory: double is not supported; use -d float, half or bfloat16".into()),
    };
    match wrong {
        Ok(0) => {}
        Ok(n) => fail(format!("{n} wrong elements")),
        Err(e) => fail(e.to_string()),
    }
}

type MpiAllreduce<T> = fn(&SimpleCommunicator, &[T], &mut [T]);

fn mpi_f32(w: &SimpleCommunicator, x: &[f32], y: &mut [f32]) {
    w.all_reduce_into(x, y, SystemOperation::sum());
}

fn mpi_f64(w: &SimpleCommunicator, x: &[f64], y: &mut [f64]) {
    w.all_reduce_into(x, y, SystemOperation::sum());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The message sizes of a sweep: `-b` to `-e` by factor `-f`, `-e` always included.
fn sweep(o: &Options) -> Vec<usize> {
    let mut sizes = vec![o.min_bytes];
    while *sizes.last().expect("one size") < o.max_bytes {
        sizes.push((sizes.last().expect("one size") * o.factor).min(o.max_bytes));
    }
    sizes
}

/// `--show-config` and `--show-dispatch`, on rank 0.
fn print_settings(comm: &Communicator, o: &Options) {
    if o.show_config {
        print!("#\n# Configuration\n{}", comm.config().dump().lines().map(|l| format!("#  {l}\n")).collect::<String>());
    }
    if o.show_dispatch {
        print!("#\n# Dispatch table\n{}", comm.dispatch_table());
    }
}

/// The nccl-tests columns both sweeps print, and the totals of the footer.
struct Table {
    ranks: usize,
    check: bool,
    wrong: usize,
    busbw_sum: f64,
    rows: usize,
}

impl Table {
    fn new(ranks: usize, check: bool) -> Self {
        Table { ranks, check, wrong: 0, busbw_sum: 0.0, rows: 0 }
    }

    /// The two header lines; `extra` names the two columns after the in-place ones, `more` any
    /// further columns (width 8) before the algorithm's name.
    fn print_header(title: &str, extra: [&str; 2], units: [&str; 2], more: &[&str]) {
        let more_names: String = more.iter().map(|m| format!("  {m:>8}")).collect();
        let more_blank: String = more.iter().map(|_| format!("  {:>8}", "")).collect();
        println!("#");
        println!("#{:>62}out-of-place{:>26}in-place{:>22}{title}", "", "", "");
        println!(
            "#{:>11}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>8}  {:>6}{more_names}  algo",
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong", extra[0], extra[1]
        );
        println!(
            "#{:>11}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}  {:>6}  {:>8}  {:>6}{more_blank}",
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "", units[0], units[1]
        );
    }

    /// Sum the wrong counts over ranks (collective), add to the totals, and return the common
    /// columns of the row.
    fn row(
        &mut self,
        world: &SimpleCommunicator,
        size: usize,
        dtype: DType,
        times: [f64; 2],
        wrong: [usize; 2],
    ) -> String {
        let mine = wrong.map(|w| w as u64);
        let mut all = [0u64; 2];
        world.all_reduce_into(&mine[..], &mut all[..], SystemOperation::sum());
        self.wrong += (all[0] + all[1]) as usize;
        let n = self.ranks;
        let bus_factor = if n > 1 { 2.0 * (n - 1) as f64 / n as f64 } else { 1.0 };
        let algbw = |t: f64| if t > 0.0 { size as f64 / t / 1e3 } else { 0.0 };
        let timed: Vec<f64> = times.iter().copied().filter(|t| !t.is_nan()).collect();
        self.busbw_sum += timed.iter().map(|&t| algbw(t)).sum::<f64>() * bus_factor;
        self.rows += timed.len();
        let chk = |w: u64| if self.check { w.to_string() } else { "N/A".to_string() };
        let half = |t: f64, w: u64| match t.is_nan() {
            true => format!("{:>7}  {:>6}  {:>6}  {:>6}", "n/a", "n/a", "n/a", chk(w)),
            false => format!("{t:7.2}  {:6.2}  {:6.2}  {:>6}", algbw(t), algbw(t) * bus_factor, chk(w)),
        };
        format!(
            "{size:>12}  {:>12}  {:>8}  {:>6}  {:>6}  {}  {}",
            size / dtype.size(),
            dtype.as_str(),
            "sum",
            -1,
            half(times[0], all[0]),
            half(times[1], all[1])
        )
    }

    fn print_footer(&self) {
        println!("# Out of bounds values : {} {}", self.wrong, if self.wrong == 0 { "OK" } else { "FAILED" });
        println!("# Avg bus bandwidth    : {:.4}", self.busbw_sum / self.rows.max(1) as f64);
        println!("#");
    }
}

/// Median per-call time in microseconds on this rank, maximum over ranks.
fn time_calls(world: &SimpleCommunicator, warmup: usize, iters: usize, mut call: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        call();
    }
    world.barrier();
    let samples: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            call();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let mine = median(samples);
    let mut worst = 0.0f64;
    world.all_reduce_into(&mine, &mut worst, SystemOperation::max());
    worst
}

fn run<T: Element>(
    comm: &Communicator,
    world: &SimpleCommunicator,
    o: &Options,
    mpi: Option<MpiAllreduce<T>>,
) -> tpcomm::Result<usize> {
    let (rank, n) = (comm.rank(), comm.size());
    let root = rank == 0;
    let boot = comm.layout();
    if o.graph_calls > 0 {
        return Err(tpcomm::Error::Unsupported {
            what: "-G on host memory".into(),
            reason: "CUDA graphs capture device work; drop -G or use --memory device".into(),
        });
    }
    if root {
        println!(
            "# tpcomm allreduce_perf: ranks {n} nodes {} minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} validation: {} memory: host",
            boot.nodes, o.min_bytes, o.max_bytes, o.factor, o.warmup, o.iters, u8::from(o.check)
        );
        print_settings(comm, o);
        println!("#\n#  Layout: {}", boot.summary());
        Table::print_header("MPI_Allreduce", ["time", "ratio"], ["(us)", "mpi/tp"], &[]);
    }
    let mut table = Table::new(n, o.check);
    for bytes in sweep(o) {
        let count = bytes / size_of::<T>();
        let size = count * size_of::<T>();
        let algo = match o.algo {
            Some(a) => a,
            None => comm.host_algo::<T>(count)?,
        };
        let seed = 0xa11 ^ (size as u64);
        let mut input = vec![T::default(); count];
        fill_rank_input(seed, rank, &mut input);
        let mut output = vec![poison::<T>(); count];
        let expected: Vec<T> =
            if o.check { expected_hierarchical_sum(seed, &boot.rank_to_node, count) } else { Vec::new() };

        // Out of place: time, then one checked call into a poisoned output.
        let mut err = None;
        let t_oop = time_calls(world, o.warmup, o.iters, || {
            if let Err(e) = comm.all_reduce_host_with(&CallOptions::algo(algo), Some(&input), &mut output) {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err.take() {
            return Err(e);
        }
        let mut wrong_oop = 0;
        if o.check {
            output.fill(poison());
            comm.all_reduce_host_with(&CallOptions::algo(algo), Some(&input), &mut output)?;
            wrong_oop = count_wrong(&output, &expected);
        }

        // In place: the buffer keeps being summed while timing; refilled for the checked call.
        output.copy_from_slice(&input);
        let t_ip = time_calls(world, o.warmup, o.iters, || {
            if let Err(e) = comm.all_reduce_host_with(&CallOptions::algo(algo), None, &mut output) {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err.take() {
            return Err(e);
        }
        let mut wrong_ip = 0;
        if o.check {
            output.copy_from_slice(&input);
            comm.all_reduce_host_with(&CallOptions::algo(algo), None, &mut output)?;
            wrong_ip = count_wrong(&output, &expected);
        }

        let t_mpi = (o.compare_mpi && mpi.is_some()).then(|| {
            let f = mpi.expect("checked");
            time_calls(world, o.warmup, o.iters, || f(world, &input, &mut output))
        });

        let common = table.row(world, size, T::DTYPE, [t_oop, t_ip], [wrong_oop, wrong_ip]);
        if root {
            let (mpi_t, ratio) = match t_mpi {
                Some(t) => (format!("{t:8.2}"), format!("{:6.2}", t / t_oop)),
                None => (format!("{:>8}", "n/a"), format!("{:>6}", "n/a")),
            };
            println!("{common}  {mpi_t}  {ratio}  {algo}");
            let _ = std::io::stdout().flush();
        }
    }
    if root {
        table.print_footer();
    }
    Ok(table.wrong)
}

/// A ROCm build: the device sweep below is written against cudarc's API, so it is built for
/// CUDA only; `--memory device` there says so, and host memory runs as in every build.
#[cfg(feature = "rocm")]
mod device {
    use super::Options;
    use mpi::topology::SimpleCommunicator;
    use tpcomm::{Communicator, Element, Error, Result};

    fn cuda_only() -> Error {
        Error::Unsupported {
            what: "allreduce_perf on device memory in a ROCm build".into(),
            reason: "the device sweep is written against cudarc (CUDA builds); use --memory host".into(),
        }
    }

    /// `--fused-norm HIDDEN`: CUDA builds only (`T` as the CUDA build's, for the same calls).
    #[allow(clippy::extra_unused_type_parameters)]
    pub fn run_norm<T: Element<Acc = f32>>(_: &Communicator, _: &SimpleCommunicator, _: &Options) -> Result<usize> {
        Err(cuda_only())
    }

    /// The device sweep: CUDA builds only.
    #[allow(clippy::extra_unused_type_parameters)]
    pub fn run<T: Element<Acc = f32>>(
        _: &Communicator,
        _: Option<&Communicator>,
        _: &SimpleCommunicator,
        _: &Options,
    ) -> Result<usize> {
        Err(cuda_only())
    }
}

/// The GPU path: buffers from `alloc_shared` (registered, zero-copy), eager calls or CUDA graphs.
#[cfg(not(feature = "rocm"))]
mod device {
    use super::{median, print_settings, sweep, Options, Table};
    use cudarc::driver::{CudaSlice, CudaStream};
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::Communicator as _;
    use mpi::traits::*;
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Instant;
    use tpcomm::verify::{count_outside_order_tolerance, count_wrong, expected_sum, narrow_rank_input, rank_input};
    use tpcomm::{Algo, CallOptions, Communicator, Element, Error, Result};

    fn cuda(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Cuda { op, source }
    }

    /// Device-to-device copy bandwidth (bytes read plus written per second) measured by rank 0
    /// alone, shared with everyone.
    fn copy_bandwidth(comm: &Communicator, world: &SimpleCommunicator, stream: &Arc<CudaStream>) -> Result<f64> {
        let mut bw = 0.0f64;
        if comm.rank() == 0 {
            let len = 128usize << 20;
            let src = stream.alloc_zeros::<u8>(len).map_err(cuda("alloc"))?;
            let mut dst = stream.alloc_zeros::<u8>(len).map_err(cuda("alloc"))?;
            stream.memcpy_dtod(&src, &mut dst).map_err(cuda("memcpy"))?;
            stream.synchronize().map_err(cuda("sync"))?;
            let reps = 20;
            let t = Instant::now();
            for _ in 0..reps {
                stream.memcpy_dtod(&src, &mut dst).map_err(cuda("memcpy"))?;
            }
            stream.synchronize().map_err(cuda("sync"))?;
            bw = 2.0 * (len * reps) as f64 / t.elapsed().as_secs_f64();
        }
        world.process_at_rank(0).broadcast_into(&mut bw);
        Ok(bw)
    }

    /// Median per-call time (us), maximum over ranks: eager calls enqueued back to back and
    /// waited for once (or each waited for, with `--eager-sync`), or replays of a graph of
    /// `graph_calls` calls.
    fn time_calls<F>(
        comm: &Communicator,
        world: &SimpleCommunicator,
        o: &Options,
        s: &Arc<CudaStream>,
        mut call: F,
    ) -> Result<f64>
    where
        F: FnMut(&Arc<CudaStream>) -> Result<()>,
    {
        let mut samples = Vec::new();
        if o.graph_calls == 0 && o.eager_sync {
            for i in 0..o.warmup + o.iters {
                world.barrier();
                let t = Instant::now();
                call(s)?;
                comm.synchronize(s)?;
                if i >= o.warmup {
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        } else if o.graph_calls == 0 {
            // Enqueue only: a loop of `iters` calls, one wait at the end; five such loops.
            for _ in 0..o.warmup {
                call(s)?;
            }
            comm.synchronize(s)?;
            for _ in 0..5 {
                world.barrier();
                let t = Instant::now();
                for _ in 0..o.iters {
                    call(s)?;
                }
                comm.synchronize(s)?;
                samples.push(t.elapsed().as_secs_f64() * 1e6 / o.iters as f64);
            }
        } else {
            let graph = comm.capture(s, |st| (0..o.graph_calls).try_for_each(|_| call(st)))?;
            for i in 0..o.warmup.max(1) + o.iters {
                world.barrier();
                let t = Instant::now();
                graph.launch()?;
                s.synchronize().map_err(cuda("sync"))?;
                if i >= o.warmup.max(1) {
                    samples.push(t.elapsed().as_secs_f64() * 1e6 / o.graph_calls as f64);
                }
            }
        }
        comm.poll()?;
        let mine = median(samples);
        let mut worst = 0.0f64;
        world.all_reduce_into(&mine, &mut worst, SystemOperation::max());
        Ok(worst)
    }

    /// Whether results are checked within a tolerance (NCCL's order of addition is its own)
    /// rather than bit for bit.
    fn tolerant(algo: Algo, ranks: usize) -> bool {
        !algo.sums_in_rank_order() && !algo.is_lossy() && ranks > 1
    }

    /// A quick codec's result: elements whose bits differ from the host model (NaN payloads
    /// aside) or that lie outside the codec's bound.
    fn check_quick<T: Element<Acc = f32>>(
        got: &[T],
        model: &[T],
        inputs: &[&[T]],
        codec: tpcomm::quant::Codec,
    ) -> usize {
        let same = |a: T, b: T| tpcomm::verify::same_bits(a, b) || (a.to_f64().is_nan() && b.to_f64().is_nan());
        let differ = got.iter().zip(model).filter(|(a, b)| !same(**a, **b)).count();
        differ + tpcomm::quant::count_outside_bound(codec, got, inputs)
    }

    /// Wrong elements: bits that differ from the rank-order sum, or for algorithms that sum in
    /// another order, values outside what any order of addition explains.
    fn check<T: Element>(got: &[T], want: &[T], seed: u64, algo: Algo, ranks: usize) -> usize {
        if tolerant(algo, ranks) {
            count_outside_order_tolerance(got, seed, ranks)
        } else {
            count_wrong(got, want)
        }
    }

    /// Say on stderr where a result differs from the reference (first elements only).
    fn report_wrong<T: Element>(rank: usize, size: usize, algo: Algo, what: &str, got: &[T], want: &[T]) {
        if tolerant(algo, 2) {
            return;
        }
        let wrong = tpcomm::verify::first_wrong(got, want, 6);
        if !wrong.is_empty() {
            eprintln!("rank {rank}: {size} bytes {algo} {what}: wrong (index, got, want): {wrong:?}");
        }
    }

    fn read<T: Element>(
        comm: &Communicator,
        s: &Arc<CudaStream>,
        buf: &impl cudarc::driver::DevicePtr<T>,
    ) -> Result<Vec<T>> {
        let mut host = vec![T::default(); buf.len()];
        s.memcpy_dtoh(buf, &mut host[..]).map_err(cuda("memcpy_dtoh"))?;
        comm.synchronize(s)?;
        Ok(host)
    }

    /// Whether NCCL can serve calls of `T` on `nccl_comm`: one eager call. The reason it cannot
    /// is printed once, by rank 0.
    fn nccl_usable<T: Element>(nccl_comm: &Communicator, s: &Arc<CudaStream>) -> Result<bool> {
        let probe = s.alloc_zeros::<T>(256).map_err(cuda("alloc"))?;
        let mut out = s.alloc_zeros::<T>(256).map_err(cuda("alloc"))?;
        match nccl_comm.all_reduce_with(&CallOptions::algo(Algo::Nccl), &probe, &mut out, s) {
            Ok(()) => Ok(true),
            Err(e) => {
                if nccl_comm.rank() == 0 {
                    println!("# nccl: n/a on this run: {e}");
                }
                Ok(false)
            }
        }
    }

    /// The buffers of one out-of-place `all_reduce_add_rms_norm`.
    struct NormBufs<'a, T> {
        x: &'a tpcomm::DeviceBuffer<T>,
        res: &'a CudaSlice<T>,
        w: &'a CudaSlice<T>,
        y: &'a mut tpcomm::DeviceBuffer<T>,
        ro: &'a mut CudaSlice<T>,
    }

    /// `all_reduce_add_rms_norm` of the first `len` elements of every buffer, rows of `hidden`.
    fn out_of_place<T: Element>(
        comm: &Communicator,
        opts: &CallOptions,
        b: NormBufs<'_, T>,
        len: usize,
        hidden: usize,
        st: &Arc<CudaStream>,
    ) -> Result<()> {
        comm.all_reduce_add_rms_norm_with(
            opts,
            &b.x.slice(0..len),
            &b.res.slice(0..len),
            &b.w.slice(0..hidden),
            1e-6,
            &mut b.y.slice_mut(0..len),
            &mut b.ro.slice_mut(0..len),
            st,
        )
    }

    /// `--fused-norm HIDDEN`: fused against split over token counts, out of place and in place.
    pub fn run_norm<T: Element<Acc = f32>>(
        comm: &Communicator,
        world: &SimpleCommunicator,
        o: &Options,
    ) -> Result<usize> {
        use tpcomm::Fusion;
        let hidden = o.fused_norm.unwrap_or(4096);
        let (rank, n) = (comm.rank(), comm.size());
        let root = rank == 0;
        let ctx = comm.cuda_context()?;
        // SAFETY: every buffer of this program is used on `s` only, or after a synchronize.
        unsafe { ctx.disable_event_tracking() };
        let s = ctx.new_stream().map_err(cuda("cuStreamCreate"))?;
        // Token counts 1, 2, 4, ... 4096, as far as `-e` allows.
        let max_tokens = (1..=4096).rev().find(|t| (t * hidden * size_of::<T>()) <= o.max_bytes).unwrap_or(1);
        let max = max_tokens * hidden;
        let mut x = comm.alloc_shared::<T>(max)?;
        let mut res = s.alloc_zeros::<T>(max).map_err(cuda("alloc"))?;
        // norm_out in a buffer every peer reaches, as an engine's tensors are inside its graphs:
        // the fused two-shot (`--algo twoshot`) writes it on every rank.
        let mut y = comm.alloc_shared::<T>(max)?;
        let mut ro = s.alloc_zeros::<T>(max).map_err(cuda("alloc"))?;
        let weight_host: Vec<T> = rank_input(0x3e3, 98, hidden);
        let w = s.clone_htod(&weight_host).map_err(cuda("memcpy_htod"))?;
        if root {
            let mode =
                if o.graph_calls > 0 { format!("graph ({} calls per graph)", o.graph_calls) } else { "eager".into() };
            println!(
                "# tpcomm allreduce_perf --fused-norm: ranks {n} hidden {hidden} dtype {} {mode}, iters {}; \
                 split = allreduce then tpcomm's norm kernel; ratio = split / fused (above 1: fusing wins)",
                T::DTYPE,
                o.iters
            );
            print_settings(comm, o);
            println!(
                "#{:>7} {:>10}  {:>9} {:>9} {:>6}  {:>9} {:>9} {:>6}  {:>6}  dispatch (out|in)",
                "tokens", "bytes", "fused_us", "split_us", "ratio", "fused_ip", "split_ip", "ratio", "#wrong"
            );
        }
        let mut wrong_total = 0;
        let mut tokens = 1;
        while tokens <= max_tokens {
            let len = tokens * hidden;
            let seed = 0x4e0 ^ len as u64;
            let mine: Vec<T> = rank_input(seed, rank, len);
            let res_host: Vec<T> = rank_input(seed ^ 1, 99, len);
            let sum: Vec<T> = expected_sum(seed, n, len);
            let (want_y, want_r) = tpcomm::verify::add_rms_norm_reference(&sum, &res_host, &weight_host, 1e-6);
            let mut times = [0.0f64; 4];
            let mut wrong = 0;
            for (k, fusion) in [Fusion::Fused, Fusion::Split].into_iter().enumerate() {
                // `--algo` forces the fused kernel's allreduce (oneshot or twoshot); split always
                // runs the dispatch's allreduce, as the engine's unfused layer would.
                let algo = if fusion == Fusion::Fused { o.algo } else { None };
                let opts = CallOptions { norm: fusion, algo, ..Default::default() };
                let staged_limit = len * size_of::<T>() <= comm.dispatch_table().custom_max_bytes();
                let fusable = n > 1 && (staged_limit || algo == Some(Algo::TwoShot));
                if fusion == Fusion::Fused && !fusable {
                    times[k] = f64::NAN;
                    times[k + 2] = f64::NAN;
                    continue;
                }
                // Check once, with fresh data, then time.
                if o.check {
                    s.memcpy_htod(&mine, &mut x.slice_mut(0..len)).map_err(cuda("memcpy_htod"))?;
                    s.memcpy_htod(&res_host, &mut res.slice_mut(0..len)).map_err(cuda("memcpy_htod"))?;
                    let poison = vec![tpcomm::verify::poison::<T>(); len];
                    s.memcpy_htod(&poison, &mut y.slice_mut(0..len)).map_err(cuda("memcpy_htod"))?;
                    s.memcpy_htod(&poison, &mut ro.slice_mut(0..len)).map_err(cuda("memcpy_htod"))?;
                    let bufs = NormBufs { x: &x, res: &res, w: &w, y: &mut y, ro: &mut ro };
                    out_of_place(comm, &opts, bufs, len, hidden, &s)?;
                    comm.synchronize(&s)?;
                    let mut got_y = vec![T::default(); len];
                    let mut got_r = vec![T::default(); len];
                    s.memcpy_dtoh(&y.slice(0..len), &mut got_y).map_err(cuda("memcpy_dtoh"))?;
                    s.memcpy_dtoh(&ro.slice(0..len), &mut got_r).map_err(cuda("memcpy_dtoh"))?;
                    s.synchronize().map_err(cuda("sync"))?;
                    wrong += count_wrong(&got_y, &want_y) + count_wrong(&got_r, &want_r);
                }
                times[k] = time_calls(comm, world, o, &s, |st| {
                    let bufs = NormBufs { x: &x, res: &res, w: &w, y: &mut y, ro: &mut ro };
                    out_of_place(comm, &opts, bufs, len, hidden, st)
                })?;
                times[k + 2] = time_calls(comm, world, o, &s, |st| {
                    comm.all_reduce_add_rms_norm_in_place_with(
                        &opts,
                        &mut x.slice_mut(0..len),
                        &mut res.slice_mut(0..len),
                        &w.slice(0..hidden),
                        1e-6,
                        st,
                    )
                })?;
            }
            let mut all = 0usize;
            world.all_reduce_into(&wrong, &mut all, SystemOperation::sum());
            wrong_total += all;
            // What the dispatch itself runs for these buffers: one call of each form.
            let auto = CallOptions::default();
            let served = |r: Result<()>| match (r, comm.last_norm_fused(), comm.last_device_algo()) {
                (Ok(()), Some(fused), Some(algo)) => format!("{} {algo}", if fused { "fused" } else { "split" }),
                _ => "-".into(),
            };
            let bufs = NormBufs { x: &x, res: &res, w: &w, y: &mut y, ro: &mut ro };
            let choice_out = served(out_of_place(comm, &auto, bufs, len, hidden, &s));
            let choice_in = served(comm.all_reduce_add_rms_norm_in_place_with(
                &auto,
                &mut x.slice_mut(0..len),
                &mut res.slice_mut(0..len),
                &w.slice(0..hidden),
                1e-6,
                &s,
            ));
            comm.synchronize(&s)?;
            if root {
                println!(
                    "{tokens:>8} {:>10}  {:>9.2} {:>9.2} {:>6.2}  {:>9.2} {:>9.2} {:>6.2}  {all:>6}  {}|{}",
                    len * size_of::<T>(),
                    times[0],
                    times[1],
                    times[1] / times[0],
                    times[2],
                    times[3],
                    times[3] / times[2],
                    choice_out,
                    choice_in
                );
                let _ = std::io::stdout().flush();
            }
            tokens *= 2;
        }
        Ok(wrong_total)
    }

    pub fn run<T: Element<Acc = f32>>(
        comm: &Communicator,
        nccl_comm: Option<&Communicator>,
        world: &SimpleCommunicator,
        o: &Options,
    ) -> Result<usize> {
        let (rank, n) = (comm.rank(), comm.size());
        let root = rank == 0;
        let ctx = comm.cuda_context()?;
        // One stream for everything, so a captured graph never waits on another stream's event.
        // SAFETY: every buffer of this program is used on `s` only, or after a synchronize.
        unsafe { ctx.disable_event_tracking() };
        let s = ctx.new_stream().map_err(cuda("cuStreamCreate"))?;
        let bw = copy_bandwidth(comm, world, &s)?;
        if root {
            let mode = if o.graph_calls > 0 {
                format!("graph ({} calls per graph)", o.graph_calls)
            } else if o.eager_sync {
                "eager, each call waited for".into()
            } else {
                format!("eager, {} calls enqueued then waited for once", o.iters)
            };
            println!(
                "# tpcomm allreduce_perf: ranks {n} minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} validation: {} memory: device, {mode}",
                o.min_bytes, o.max_bytes, o.factor, o.warmup, o.iters, u8::from(o.check)
            );
            println!(
                "#  GPU: {}, device-to-device copy {:.0} GB/s (read + write)",
                ctx.name().unwrap_or_default(),
                bw / 1e9
            );
            print_settings(comm, o);
        }
        let nccl = match nccl_comm {
            Some(nc) => nccl_usable::<T>(nc, &s)?.then_some(nc),
            None => None,
        };
        let flags = if o.floor { Some(time_calls(comm, world, o, &s, |st| comm.exchange_flags(st))?) } else { None };
        if root {
            if let Some(f) = flags {
                println!("# flag-exchange floor: {f:.2} us (one flag to and from every peer, same mode)");
            }
            if let Some(codec) = o.quick {
                println!(
                    "# quick {codec}: {} bytes per group of 32 values on the wire ({} bytes per 16-bit element)",
                    codec.wire_bytes_per_group(),
                    codec.wire_bytes_per_group() as f64 / 32.0
                );
                Table::print_header("exact path", ["exact", "q/exact"], ["(us)", ""], &["maxabs", "maxrel", "rmsrel"]);
            } else if nccl_comm.is_some() {
                Table::print_header("NCCL", ["nccl", "ratio"], ["(us)", "nccl/tp"], &[]);
            } else if o.reference.is_some() {
                Table::print_header("reference", ["ref", "ref/tp"], ["(us)", ""], &[]);
            } else if flags.is_some() {
                Table::print_header("flag floor", ["floor", "x floor"], ["(us)", ""], &[]);
            } else {
                Table::print_header("HBM floor", ["floor", "floor%"], ["(us)", ""], &[]);
            }
        }
        let mut table = Table::new(n, o.check);
        for bytes in sweep(o) {
            let count = bytes / size_of::<T>();
            let size = count * size_of::<T>();
            let algo = match (o.quick, o.algo) {
                (Some(codec), _) => Algo::quick(codec),
                (None, Some(a)) => a,
                (None, None) => match comm.device_algo::<T>(count) {
                    Ok(a) => a,
                    Err(e) => {
                        if root {
                            println!("# stopping at {size} bytes: {e}");
                        }
                        break;
                    }
                },
            };
            if count > 0 {
                let seed = 0xd1ce ^ size as u64;
                // Inputs of magnitude 1..2 where a tolerance is checked, so a missing rank shows.
                let input_host: Vec<T> = if tolerant(algo, n) {
                    narrow_rank_input(seed, rank, count)
                } else {
                    rank_input(seed, rank, count)
                };
                let expected: Vec<T> = if o.check && !tolerant(algo, n) && o.quick.is_none() {
                    expected_sum(seed, n, count)
                } else {
                    Vec::new()
                };
                // Quick: every rank's input, and the model's bits.
                let all_inputs: Vec<Vec<T>> = match (o.quick, o.check) {
                    (Some(_), true) => (0..n).map(|r| rank_input(seed, r, count)).collect(),
                    _ => Vec::new(),
                };
                let views: Vec<&[T]> = all_inputs.iter().map(|x| &x[..]).collect();
                let model: Vec<T> = match (o.quick, o.check) {
                    (Some(codec), true) => tpcomm::quant::quick_reference(codec, &views),
                    _ => Vec::new(),
                };
                let mut stats = None;
                let mut input = comm.alloc_shared::<T>(count)?;
                s.memcpy_htod(&input_host[..], &mut input).map_err(cuda("memcpy_htod"))?;
                let poison = vec![tpcomm::verify::poison::<T>(); count];
                let mut output: CudaSlice<T> = s.alloc_zeros::<T>(count).map_err(cuda("alloc"))?;
                // The dispatch's own choice unless one is asked for: it knows the buffers, which
                // decide some choices (registered or captured ones may take two-shot above the
                // staging size); the columns print what served the calls.
                let forced = match (o.quick, o.algo) {
                    (None, None) => CallOptions::default(),
                    _ => CallOptions::algo(algo),
                };
                let trace = |phase: &str| {
                    if comm.config().debug && root {
                        eprintln!("allreduce_perf: {size} bytes {algo}: {phase}");
                    }
                };
                // Out of place.
                trace("out-of-place timing");
                let t_oop =
                    time_calls(comm, world, o, &s, |st| comm.all_reduce_with(&forced, &input, &mut output, st))?;
                let algo = comm.last_device_algo().unwrap_or(algo);
                let mut wrong_oop = 0;
                if o.check {
                    trace("out-of-place check");
                    s.memcpy_htod(&poison[..], &mut output).map_err(cuda("memcpy_htod"))?;
                    comm.all_reduce_with(&forced, &input, &mut output, &s)?;
                    // The check runs eagerly: its algorithm may differ from the timed one's.
                    let algo = comm.last_device_algo().unwrap_or(algo);
                    let got = read(comm, &s, &output)?;
                    if let Some(codec) = o.quick {
                        wrong_oop = check_quick(&got, &model, &views, codec);
                        stats = Some(tpcomm::quant::error_stats(&got, &views));
                    } else {
                        wrong_oop = check(&got, &expected, seed, algo, n);
                        report_wrong(rank, size, algo, "out-of-place", &got, &expected);
                    }
                }
                // In place, in the registered buffer (values keep growing while timing).
                trace("in-place timing");
                // A lossy codec is not timed in place: the sums grow replay after replay until they
                // are infinite, and poisoned groups skip the codec's arithmetic (measured: 2x
                // "faster"). Its in-place result is still checked below.
                let t_ip = if algo.is_lossy() {
                    f64::NAN
                } else {
                    time_calls(comm, world, o, &s, |st| comm.all_reduce_in_place_with(&forced, &mut input, st))?
                };
                let algo_ip = match algo.is_lossy() {
                    true => algo,
                    false => comm.last_device_algo().unwrap_or(algo),
                };
                let mut wrong_ip = 0;
                if o.check {
                    trace("in-place check");
                    s.memcpy_htod(&input_host[..], &mut input).map_err(cuda("memcpy_htod"))?;
                    comm.all_reduce_in_place_with(&forced, &mut input, &s)?;
                    let algo_ip = comm.last_device_algo().unwrap_or(algo);
                    let got: Vec<T> = read(comm, &s, &input)?;
                    if let Some(codec) = o.quick {
                        wrong_ip = check_quick(&got, &model, &views, codec);
                    } else {
                        wrong_ip = check(&got, &expected, seed, algo_ip, n);
                        report_wrong(rank, size, algo_ip, "in-place", &got, &expected);
                    }
                }
                // NCCL on the same input, out of place, timed the same way.
                let t_nccl = match nccl {
                    Some(nc) => {
                        trace("nccl timing");
                        let nccl_opts = CallOptions::algo(Algo::Nccl);
                        Some(time_calls(nc, world, o, &s, |st| {
                            nc.all_reduce_with(&nccl_opts, &input, &mut output, st)
                        })?)
                    }
                    None => None,
                };
                // Quick: the exact path for the same call, timed the same way.
                let t_exact = match o.quick {
                    Some(_) => {
                        trace("exact timing");
                        let exact = if size <= comm.config().custom_max_bytes { Algo::TwoShot } else { Algo::Chunked };
                        let opts = CallOptions::algo(exact);
                        Some(time_calls(comm, world, o, &s, |st| comm.all_reduce_with(&opts, &input, &mut output, st))?)
                    }
                    None => None,
                };
                let common = table.row(world, size, T::DTYPE, [t_oop, t_ip], [wrong_oop, wrong_ip]);
                let reference = o
                    .reference
                    .as_ref()
                    .map(|rows| rows.iter().find(|&&(r, b, _)| r == n && b == size).map(|&(_, _, us)| us));
                let extra = if let Some(t) = t_exact {
                    match stats {
                        Some(e) => format!(
                            "{t:8.2}  {:6.2}  {:8.2e}  {:8.2e}  {:8.2e}",
                            t_oop / t,
                            e.max_abs,
                            e.max_rel,
                            e.rms_rel
                        ),
                        None => format!("{t:8.2}  {:6.2}  {:>8}  {:>8}  {:>8}", t_oop / t, "-", "-", "-"),
                    }
                } else {
                    match (nccl_comm, t_nccl, reference, flags) {
                        (Some(_), Some(t), _, _) => format!("{t:8.2}  {:6.2}", t / t_oop),
                        (Some(_), None, _, _) => format!("{:>8}  {:>6}", "n/a", "n/a"),
                        (None, _, Some(Some(r)), _) => format!("{r:8.2}  {:6.2}", r / t_oop.min(t_ip)),
                        (None, _, Some(None), _) => format!("{:>8}  {:>6}", "n/a", "n/a"),
                        (None, _, None, Some(f)) => format!("{f:8.2}  {:5.2}x", t_oop / f),
                        (None, _, None, None) => {
                            let floor_us = algo.hbm_floor_bytes(n, size) / bw * 1e6;
                            format!("{floor_us:8.2}  {:5.0}%", 100.0 * floor_us / t_oop)
                        }
                    }
                };
                if root {
                    // The algorithm, and the in-place one where it differs ("oneshot|twoshot").
                    match algo_ip == algo {
                        true => println!("{common}  {extra}  {algo}"),
                        false => println!("{common}  {extra}  {algo}|{algo_ip}"),
                    }
                    let _ = std::io::stdout().flush();
                }
            }
        }
        if root {
            table.print_footer();
        }
        Ok(table.wrong)
    }
}
