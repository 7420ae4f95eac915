//! Integration tests of the host backend as real MPI jobs.
//!
//! Run by plain `cargo test`: this binary (harness = false) is the launcher. For each case it
//! starts itself under `mpiexec -n k` with `TPCOMMTEST_CASE` set; the copies it starts are the
//! ranks, which run the case and exit non-zero on any failure. Every job runs under a
//! wall-clock limit, so a protocol bug fails the test instead of hanging it. The launcher ends
//! with `N passed, M failed`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tpcomm::verify::{count_wrong, expected_hierarchical_sum, fill_rank_input, poison, rank_input, SplitMix64};
use tpcomm::{bf16, f16, Algo, Communicator, Config, Element, Error};

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
    }
    for ranks in 2..=4 {
        jobs.push(Job {
            case: "exact",
            ranks,
            env: &[("TPCOMM_FAKE_NODES", "2"), ("TPCOMM_HOST_CHUNK_BYTES", "8192")],
        });
        jobs.push(Job { case: "mismatched_lengths", ranks, env: &[("TPCOMM_TIMEOUT_MS", "20000")] });
        jobs.push(Job { case: "rank_skips_call", ranks, env: &[("TPCOMM_TIMEOUT_MS", "1500")] });
        jobs.push(Job { case: "input_output_lengths_differ", ranks, env: &[("TPCOMM_TIMEOUT_MS", "1500")] });
    }
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
            env: &[("TPCOMM_DETERMINISTIC", "1"), ("TPCOMM_HOST_CHUNK_BYTES", "4096")],
        });
    }
    jobs.push(Job {
        case: "deterministic",
        ranks: 4,
        env: &[("TPCOMM_DETERMINISTIC", "1"), ("TPCOMM_FAKE_NODES", "2"), ("TPCOMM_HOST_CHUNK_BYTES", "8192")],
    });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_ALGO", "fastest")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_ALGO", "nccl"), ("TPCOMM_DETERMINISTIC", "1")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_TIMEOUT_MS", "-3")] });
    jobs.push(Job { case: "invalid_config", ranks: 1, env: &[("TPCOMM_NO_SUCH_KNOB", "1")] });

    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (mut passed, mut failed) = (0, 0);
    for job in jobs.iter().filter(|j| filter.as_deref().is_none_or(|f| j.case.contains(f))) {
        let name = format!("{} ranks={} {:?}", job.case, job.ranks, job.env);
        let start = Instant::now();
        match run_job(job) {
            Ok(()) => {
                passed += 1;
                println!("ok     {name} ({:.1} s)", start.elapsed().as_secs_f64());
            }
            Err(log) => {
                failed += 1;
                println!("FAILED {name}\n{log}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
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

fn run_job(job: &Job) -> Result<(), String> {
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
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!("exit status {s}\n{output}")),
        None => Err(format!("killed after {} s (hang)\n{output}", JOB_LIMIT.as_secs())),
    }
}

// ---------------------------------------------------------------- ranks

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
    if case == "different_config_per_rank" {
        return different_config_per_rank(&world, config);
    }
    if case == "byte_exchange" {
        return report(&world, byte_exchange(&world));
    }
    if case == "tune_save_and_load" {
        return report(&world, tune_save_and_load(&world, config));
    }
    let comm = match Communicator::new(&world, config) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL: Communicator::new: {e}");
            return 1;
        }
    };
    let result = match case {
        "exact" => exact(&comm),
        "mismatched_lengths" => mismatched_lengths(&comm),
        "batch_invariance" => batch_invariance(&comm),
        "deterministic" => deterministic(&comm),
        "nodes_disagree_on_length" => nodes_disagree_on_length(&comm),
        "rank_skips_call" => rank_skips_call(&comm),
        "input_output_lengths_differ" => input_output_lengths_differ(&comm),
        other => Err(format!("unknown case {other}")),
    };
    match result {
        Ok(summary) => {
            println!("rank {} ok: {summary}", comm.rank());
            0
        }
        Err(msg) => {
            println!("FAIL rank {}: {msg}", comm.rank());
            1
        }
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
            0 => exact_for::<f32>(comm)?,
            1 => exact_for::<f64>(comm)?,
            2 => exact_for::<f16>(comm)?,
            _ => exact_for::<bf16>(comm)?,
        };
    }
    Ok(format!("{checks} results bit-exact"))
}

fn exact_for<T: Element>(comm: &Communicator) -> Result<usize, String> {
    let (rank, n) = (comm.rank(), comm.size());
    let rank_to_node = comm.bootstrap().rank_to_node.clone();
    let mut checks = 0;
    // The same seed on every rank: sizes agree, inputs differ by rank.
    let base_seed = 0x5eed ^ (n as u64) << 8 ^ T::DTYPE as u64;
    for (i, &len) in sizes(base_seed).iter().enumerate() {
        // Large messages once per dtype and algorithm is plenty; keep the job quick.
        let algos: &[Option<Algo>] = if len > 1 << 18 {
            &[Some(Algo::HostTwoShot)]
        } else {
            &[None, Some(Algo::HostOneShot), Some(Algo::HostTwoShot)]
        };
        for (a, algo) in algos.iter().enumerate() {
            for in_place in [false, true] {
                let seed = base_seed.wrapping_mul(31).wrapping_add((i * 8 + a * 2 + in_place as usize) as u64);
                let input: Vec<T> = rank_input(seed, rank, len);
                let mut out = vec![poison::<T>(); len];
                let res = match (algo, in_place) {
                    (None, false) => comm.all_reduce_host(&input, &mut out),
                    (None, true) => {
                        out.copy_from_slice(&input);
                        comm.all_reduce_host_in_place(&mut out)
                    }
                    (Some(algo), false) => comm.all_reduce_host_using(*algo, Some(&input), &mut out),
                    (Some(algo), true) => {
                        fill_rank_input(seed, rank, &mut out);
                        comm.all_reduce_host_using(*algo, None, &mut out)
                    }
                };
                res.map_err(|e| format!("{} len {len} algo {algo:?} in_place {in_place}: {e}", T::DTYPE))?;
                let want: Vec<T> = expected_hierarchical_sum(seed, &rank_to_node, len);
                let wrong = count_wrong(&out, &want);
                if wrong > 0 {
                    let first = out.iter().zip(&want).position(|(a, b)| !tpcomm::verify::same_bits(*a, *b)).unwrap();
                    return Err(format!(
                        "{} len {len} algo {algo:?} in_place {in_place}: {wrong} wrong elements, first at {first}: got {:?} want {:?}",
                        T::DTYPE, out[first], want[first]
                    ));
                }
                checks += 1;
            }
        }
    }
    Ok(checks)
}

fn report(world: &mpi::topology::SimpleCommunicator, result: Result<String, String>) -> i32 {
    use mpi::traits::Communicator as _;
    match result {
        Ok(summary) => {
            println!("rank {} ok: {summary}", world.rank());
            0
        }
        Err(msg) => {
            println!("FAIL rank {}: {msg}", world.rank());
            1
        }
    }
}

/// The bootstrap's byte exchange with blobs of different lengths, empty ones included (an empty
/// buffer once reached MPI as an invalid pointer and aborted the job).
fn byte_exchange(world: &mpi::topology::SimpleCommunicator) -> Result<String, String> {
    use mpi::traits::Communicator as _;
    use tpcomm::bootstrap::{all_gather_bytes, broadcast_bytes};
    let (rank, n) = (world.rank() as usize, world.size() as usize);
    let blob = |r: usize| -> Vec<u8> { (0..r * 3).map(|i| (r * 31 + i) as u8).collect() };
    let all = all_gather_bytes(world, &blob(rank));
    if all != (0..n).map(blob).collect::<Vec<_>>() {
        return Err(format!("all_gather_bytes gave {all:?}"));
    }
    let empty = all_gather_bytes(world, &[]);
    if empty.len() != n || empty.iter().any(|b| !b.is_empty()) {
        return Err(format!("all_gather_bytes of nothing gave {empty:?}"));
    }
    for root in 0..n {
        for len in [0usize, 1, 1000] {
            let mut b: Vec<u8> =
                if rank == root { (0..len).map(|i| (i * 7 + root) as u8).collect() } else { vec![9; 5] };
            broadcast_bytes(world, root, &mut b);
            if b != (0..len).map(|i| (i * 7 + root) as u8).collect::<Vec<u8>>() {
                return Err(format!("broadcast_bytes from {root} of {len} bytes gave {} bytes", b.len()));
            }
        }
    }
    Ok("all_gather_bytes and broadcast_bytes right for empty and unequal blobs".into())
}

/// `tune` gives every rank the same table and saves it; a new communicator loads it; a table
/// tuned for another machine is refused on every rank.
fn tune_save_and_load(world: &mpi::topology::SimpleCommunicator, mut config: Config) -> Result<String, String> {
    use mpi::traits::{Communicator as _, CommunicatorCollectives as _};
    let dir = std::path::PathBuf::from(std::env::var("TPCOMMTEST_DIR").map_err(|e| e.to_string())?);
    let file = dir.join("dispatch.txt");
    config.tune_file = Some(file.clone());
    let comm = Communicator::new(world, config.clone()).map_err(|e| format!("new: {e}"))?;
    let tuned = comm.tune().map_err(|e| format!("tune: {e}"))?;
    let limit = tuned.host_oneshot_max_bytes as u64;
    let mut all = vec![0u64; world.size() as usize];
    world.all_gather_into(&limit, &mut all[..]);
    if all.iter().any(|&l| l != limit) {
        return Err(format!("ranks ended with different tuned limits {all:?}"));
    }
    if limit != 0 && !(12..=22).any(|p| limit == 1 << p) {
        return Err(format!("tuned limit {limit} is not one of the measured sizes"));
    }
    if comm.dispatch_table().host_oneshot_max_bytes as u64 != limit {
        return Err("the communicator does not use the tuned table".into());
    }
    // The tuned limit must route calls: one byte above it goes two-shot.
    if comm.host_algo::<f32>((limit as usize + 4) / 4).map_err(|e| e.to_string())? != Algo::HostTwoShot {
        return Err("a call above the tuned limit is not two-shot".into());
    }
    drop(comm);
    world.barrier();
    let again = Communicator::new(world, config.clone()).map_err(|e| format!("new after tune: {e}"))?;
    if again.dispatch_table() != tuned {
        return Err(format!("loaded table {:?} differs from tuned {tuned:?}", again.dispatch_table()));
    }
    drop(again);
    world.barrier();
    if world.rank() == 0 {
        let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
        let other: String = text
            .lines()
            .map(|l| if l.starts_with("key ") { "key cpu=elsewhere\n".to_string() } else { format!("{l}\n") })
            .collect();
        std::fs::write(&file, other).map_err(|e| e.to_string())?;
    }
    world.barrier();
    match Communicator::new(world, config) {
        Err(Error::Config { expected, .. }) if expected.contains("--autotune") => {
            Ok(format!("tuned host one-shot limit {limit} B: shared, saved, loaded; a foreign table refused"))
        }
        Err(e) => Err(format!("a foreign table gave {e}, not a Config error")),
        Ok(_) => Err("a table tuned for another machine was accepted".into()),
    }
}

/// Rank 2 runs with another chunk size: every rank must refuse to build the communicator.
fn different_config_per_rank(world: &mpi::topology::SimpleCommunicator, mut config: Config) -> i32 {
    use mpi::traits::Communicator as _;
    if world.rank() == 2 {
        config.host_chunk_bytes *= 2;
    }
    match Communicator::new(world, config) {
        Err(Error::Mismatch { detail, .. })
            if detail.contains("rank 2") && detail.contains("TPCOMM_HOST_CHUNK_BYTES") =>
        {
            println!("rank {} ok: refused: {detail}", world.rank());
            0
        }
        Err(e) => {
            println!("FAIL rank {}: expected a Mismatch naming rank 2, got {e}", world.rank());
            1
        }
        Ok(_) => {
            println!("FAIL rank {}: a communicator was built with differing configurations", world.rank());
            1
        }
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
            comm.all_reduce_host_using(algo, None, &mut buf).map_err(|e| format!("len {len} {algo}: {e}"))?;
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
/// on every rank, and the whole message matches the reference too. The dispatch table must also
/// keep large device messages off NCCL.
fn deterministic(comm: &Communicator) -> Result<String, String> {
    use tpcomm::dispatch::{Memory, Request};
    if !comm.config().deterministic {
        return Err("run this case with TPCOMM_DETERMINISTIC=1".into());
    }
    let (rank, n) = (comm.rank(), comm.size());
    let boot = comm.bootstrap();
    let device = Request::new(64 << 20, tpcomm::DType::BF16, n, boot.nodes, Memory::Device);
    match comm.dispatch_table().choose(&device) {
        // One rank copies its input: exact, hence deterministic.
        Ok(Algo::Copy) if n == 1 => {}
        Ok(Algo::Chunked) if boot.nodes == 1 && n > 1 => {}
        Err(Error::Unsupported { .. }) if boot.nodes > 1 => {}
        other => return Err(format!("64 MiB of device memory on {} node(s) went to {other:?}", boot.nodes)),
    }
    let mut checks = deterministic_for::<f32>(comm)?;
    checks += deterministic_for::<bf16>(comm)?;
    // Every rank reached the same count: no rank skipped a case.
    let mut all = vec![0u64; n];
    {
        use mpi::collective::CommunicatorCollectives as _;
        comm.bootstrap().world().all_gather_into(&(checks as u64), &mut all[..]);
    }
    if all.iter().any(|&c| c != checks as u64) {
        return Err(format!("ranks ran different numbers of checks: {all:?} (rank {rank})"));
    }
    Ok(format!("{checks} embeddings gave the reference bits"))
}

fn deterministic_for<T: Element>(comm: &Communicator) -> Result<usize, String> {
    const WINDOW: usize = 777;
    const PROBE_SEED: u64 = 0xde7e;
    let (rank, n) = (comm.rank(), comm.size());
    let rank_to_node = comm.bootstrap().rank_to_node.clone();
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
    for (len, offset) in cases {
        let all: Vec<Vec<T>> = (0..n).map(|r| message(r, len, offset)).collect();
        let views: Vec<&[T]> = all.iter().map(|b| &b[..]).collect();
        let want_all = tpcomm::hierarchy::hierarchical_reference(&views, &rank_to_node);
        for (algo, in_place) in
            [(None, false), (None, true), (Some(Algo::HostOneShot), false), (Some(Algo::HostTwoShot), true)]
        {
            let input = all[rank].clone();
            let mut out = vec![poison::<T>(); len];
            let what = format!("{} len {len} offset {offset} {algo:?} in_place {in_place}", T::DTYPE);
            let r = match (algo, in_place) {
                (None, false) => comm.all_reduce_host(&input, &mut out),
                (None, true) => {
                    out.copy_from_slice(&input);
                    comm.all_reduce_host_in_place(&mut out)
                }
                (Some(a), false) => comm.all_reduce_host_using(a, Some(&input), &mut out),
                (Some(a), true) => {
                    out.copy_from_slice(&input);
                    comm.all_reduce_host_using(a, None, &mut out)
                }
            };
            r.map_err(|e| format!("{what}: {e}"))?;
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
    let len = 100 + 100 * comm.bootstrap().node_index();
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
        Err(Error::Mismatch { detail, .. }) if detail.contains("1000") && detail.contains("999") => {}
        other => return Err(format!("expected a Mismatch naming both lengths, got {other:?}")),
    }
    match comm.all_reduce_host(&input, &mut out) {
        Err(Error::Poisoned { .. }) => Ok("mismatch reported, then poisoned".into()),
        other => Err(format!("expected Poisoned after the mismatch, got {other:?}")),
    }
}

fn rank_skips_call(comm: &Communicator) -> Result<String, String> {
    let skipper = comm.size() - 1;
    let input: Vec<f32> = rank_input(2, comm.rank(), 4096);
    let mut out = vec![0.0f32; 4096];
    // One good call first, so the skipped one is not the first.
    comm.all_reduce_host(&input, &mut out).map_err(|e| format!("first call: {e}"))?;
    if comm.rank() == skipper {
        return Ok("skipped the second call".into());
    }
    let start = Instant::now();
    match comm.all_reduce_host(&input, &mut out) {
        Err(Error::PeerTimeout { peer: Some(p), .. }) if p == skipper => {
            Ok(format!("timed out naming rank {p} after {:.2} s", start.elapsed().as_secs_f64()))
        }
        // A rank on another pretend node waits in the cross-node leg or on a node peer that
        // itself timed out; it must still end in a timeout, not hang.
        Err(Error::PeerTimeout { .. }) if comm.bootstrap().nodes > 1 => Ok("timed out".into()),
        other => Err(format!("expected PeerTimeout naming rank {skipper}, got {other:?}")),
    }
}

fn input_output_lengths_differ(comm: &Communicator) -> Result<String, String> {
    let input: Vec<f32> = rank_input(3, comm.rank(), 64);
    let mut out = vec![0.0f32; if comm.rank() == 0 { 65 } else { 64 }];
    match (comm.rank(), comm.all_reduce_host(&input, &mut out)) {
        (0, Err(Error::InvalidArgument { detail, .. })) => Ok(format!("refused: {detail}")),
        (r, Err(Error::PeerTimeout { peer: Some(0), .. })) if r != 0 => Ok("timed out waiting for rank 0".into()),
        (_, other) => Err(format!("unexpected {other:?}")),
    }
}
