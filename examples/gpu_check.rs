//! Self-checking GPU test of the custom CUDA IPC allreduce. Run under mpirun:
//!
//! ```text
//! mpirun -np 4 target/release/examples/gpu_check [--quick] [--bench | --bench-only] [--topology]
//! ```
//!
//! Objective: prove that every device path gives `tpcomm::dtype::reference_sum`'s bits on every
//! rank, and that bad calls fail with typed errors instead of hanging or corrupting.
//!
//! What it checks, for f32, f16 and bf16, sizes from 1 element to 64 MiB (odd counts and tails
//! that are not a whole 16-byte vector included), forced one-shot and two-shot:
//! - registered (input from `alloc_shared`), staged (input from cudarc's allocator) and
//!   graph-captured calls (input from `alloc_device`, read in place by the graph, or from
//!   cudarc's allocator, staged inside the graph), in place and out of place;
//! - graph replays with fresh inputs between replays (10,000 at one small size);
//! - bad inputs: unregistered pointer on the registered path, oversize, misaligned pointers,
//!   different input and output lengths, f64;
//! - a rank that skips a call (the others must get `Error::PeerTimeout`), ranks capturing
//!   different numbers of calls, and ranks passing different lengths (`Error::Mismatch`);
//! - NCCL: at world size 1, forced NCCL calls (eager, in place, graph) give the reference bits
//!   for f32 and bf16; with ranks sharing a GPU, forcing NCCL gives `Error::Unsupported` naming
//!   the duplicate GPU on every rank, and the communicator still works afterwards;
//! - deterministic mode (a communicator with `deterministic` on and a 1 MiB custom limit):
//!   messages of 3-5 MiB with odd lengths go chunked and give the rank-order reference bits
//!   (eager, registered, staged, in place, graphs), and one probe embedded at different offsets
//!   in messages of different sizes gives the same bits every time.
//!
//! Every rank's input is a pure function of (seed, rank, index), so every rank computes the
//! reference over all ranks' inputs. Outputs, and 64 elements after them, are poisoned (NaN)
//! before each call, and the elements after must still hold the poison; inputs are never zero. Prints `N passed, M failed` (summed over ranks) and exits non-zero on a failure.
//! `--bench` adds a latency table (eager and graph replays); `--bench-only` prints only that.

use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use mpi::collective::SystemOperation;
use mpi::topology::Communicator as _;
use mpi::traits::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tpcomm::dtype::reference_sum;
use tpcomm::{bf16, f16, Algo, Communicator, Config, Element, Error};

const MIB: usize = 1 << 20;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rank `r`'s element `i` for `seed`: a non-zero value of either sign between 2^-4 and 2^4.
fn value<T: Element>(seed: u64, r: usize, i: usize) -> T {
    let h = splitmix(seed ^ ((r as u64) << 48) ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mant = 0.5 + (h >> 11) as f64 / (1u64 << 53) as f64;
    let exp = (h & 7) as i32 - 3;
    let sign = if (h >> 3) & 1 == 1 { -1.0 } else { 1.0 };
    let v = T::from_f64(sign * mant * 2f64.powi(exp));
    if v.to_f64() == 0.0 {
        T::from_f64(0.75)
    } else {
        v
    }
}

/// Inputs repeat with this prime period, so the reference over all ranks costs n * PERIOD
/// sums whatever the length (64 MiB messages at 8 ranks stay cheap to check). A prime period
/// puts different values in every lane, vector, block and shard position.
const PERIOD: usize = 65521;

/// Every rank's input for one seed: rank `r`'s element `i` is `tables[r][(i + shift) % p]`.
struct Inputs<T> {
    tables: Vec<Vec<T>>,
    shift: usize,
    /// `reference_sum` over the ranks' tables: the expected result at `(i + shift) % p`.
    reference: Vec<T>,
}

impl<T: Element> Inputs<T> {
    fn new(seed: u64, n: usize, len: usize) -> Self {
        let p = len.clamp(1, PERIOD);
        let tables: Vec<Vec<T>> = (0..n).map(|r| (0..p).map(|k| value(seed, r, k)).collect()).collect();
        let refs: Vec<&[T]> = tables.iter().map(|t| &t[..]).collect();
        let reference = reference_sum(&refs);
        Inputs { tables, shift: (splitmix(seed) % p as u64) as usize, reference }
    }

    fn rank_input(&self, r: usize, len: usize) -> Vec<T> {
        let t = &self.tables[r];
        (0..len).map(|i| t[(i + self.shift) % t.len()]).collect()
    }

    /// Elements of `out` whose bits differ from the reference, and the first of them.
    fn verify(&self, out: &[T]) -> (usize, String) {
        let p = self.reference.len();
        let mut wrong = 0;
        let mut first = String::new();
        for (i, o) in out.iter().enumerate() {
            let e = self.reference[(i + self.shift) % p];
            if o.to_f64().to_bits() != e.to_f64().to_bits() {
                if wrong == 0 {
                    first = format!("element {i}: got {o:?} expected {e:?}");
                }
                wrong += 1;
            }
        }
        (wrong, first)
    }
}

struct Tally {
    rank: usize,
    passed: usize,
    failed: usize,
}

impl Tally {
    fn record(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                self.failed += 1;
                eprintln!("FAIL rank {}: {name}: {e:#}", self.rank);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Registered,
    Staged,
    GraphIpc,
    GraphPool,
}

/// Per-dtype device buffers, allocated once at the largest size.
struct Bufs<T> {
    shared: tpcomm::communicator::DeviceBuffer<T>,
    ipc: tpcomm::communicator::DeviceBuffer<T>,
    pool: CudaSlice<T>,
    out: CudaSlice<T>,
}

trait Dev: Element + DeviceRepr + ValidAsZeroBits {}
impl<T: Element + DeviceRepr + ValidAsZeroBits> Dev for T {}

impl<T: Dev> Bufs<T> {
    /// Every kind of buffer, `len` elements each (collective: `alloc_shared` registers).
    fn new(c: &Ctx, len: usize) -> Result<Self> {
        Ok(Bufs {
            shared: c.comm.alloc_shared::<T>(len)?,
            ipc: c.comm.alloc_device::<T>(len)?,
            pool: c.stream.alloc_zeros::<T>(len)?,
            out: c.stream.alloc_zeros::<T>(len)?,
        })
    }
}

struct Ctx<'a> {
    comm: &'a Communicator,
    stream: Arc<CudaStream>,
    n: usize,
    rank: usize,
    seed: u64,
}

impl Ctx<'_> {
    fn next_seed(&mut self) -> u64 {
        self.seed += 1;
        splitmix(self.seed)
    }
}

fn poison<T: Dev>(stream: &Arc<CudaStream>, dst: &mut cudarc::driver::CudaViewMut<'_, T>) -> Result<()> {
    let nan = vec![T::from_f64(f64::NAN); dst.len()];
    stream.memcpy_htod(&nan, dst)?;
    Ok(())
}

fn read<T: Dev>(stream: &Arc<CudaStream>, src: &cudarc::driver::CudaView<'_, T>) -> Result<Vec<T>> {
    let mut host = vec![T::default(); src.len()];
    stream.memcpy_dtoh(src, &mut host)?;
    stream.synchronize()?;
    Ok(host)
}

/// Elements after the message that are poisoned too and must stay untouched.
const GUARD: usize = 64;

/// Poison up to [`GUARD`] elements of `buf` after the first `len`; returns how many.
fn guard_poison<T: Dev>(s: &Arc<CudaStream>, buf: &mut CudaSlice<T>, len: usize) -> Result<usize> {
    let g = GUARD.min(buf.len() - len);
    if g > 0 {
        poison(s, &mut buf.slice_mut(len..len + g))?;
    }
    Ok(g)
}

/// Check that the `g` guard elements after `len` still hold the poison.
fn guard_check<T: Dev>(s: &Arc<CudaStream>, buf: &CudaSlice<T>, len: usize, g: usize) -> Result<()> {
    if g == 0 {
        return Ok(());
    }
    let after = read(s, &buf.slice(len..len + g))?;
    match after.iter().position(|x| !x.to_f64().is_nan()) {
        None => Ok(()),
        Some(i) => Err(anyhow!("element {} past the end of the message was written ({:?})", len + i, after[i])),
    }
}

fn check_out<T: Dev>(inputs: &Inputs<T>, got: &[T]) -> Result<()> {
    let (wrong, first) = inputs.verify(got);
    if wrong > 0 {
        return Err(anyhow!("{wrong} of {} elements differ from reference_sum; first: {first}", got.len()));
    }
    Ok(())
}

/// One eager call (registered or staged), in place or not.
fn eager_case<T: Dev>(c: &mut Ctx, b: &mut Bufs<T>, algo: Algo, path: Path, in_place: bool, len: usize) -> Result<()> {
    let seed = c.next_seed();
    let inputs = Inputs::<T>::new(seed, c.n, len);
    let x = inputs.rank_input(c.rank, len);
    let s = c.stream.clone();
    let input: &mut CudaSlice<T> = match path {
        Path::Registered => &mut b.shared,
        _ => &mut b.pool,
    };
    s.memcpy_htod(&x, &mut input.slice_mut(0..len))?;
    if in_place {
        let g = guard_poison(&s, input, len)?;
        c.comm.all_reduce_in_place_using(Some(algo), &mut input.slice_mut(0..len), &s)?;
        let got = read(&s, &input.slice(0..len))?;
        check_out(&inputs, &got)?;
        return guard_check(&s, input, len, g);
    }
    poison(&s, &mut b.out.slice_mut(0..len))?;
    let g = guard_poison(&s, &mut b.out, len)?;
    if path == Path::Registered {
        c.comm.all_reduce_registered_using(Some(algo), &input.slice(0..len), &mut b.out.slice_mut(0..len), &s)?;
    } else {
        c.comm.all_reduce_using(Some(algo), &input.slice(0..len), &mut b.out.slice_mut(0..len), &s)?;
    }
    let got = read(&s, &b.out.slice(0..len))?;
    check_out(&inputs, &got)?;
    guard_check(&s, &b.out, len, g)
}

/// Capture one call into a graph, then replay it `replays` times with fresh inputs.
fn graph_case<T: Dev>(
    c: &mut Ctx,
    b: &mut Bufs<T>,
    algo: Algo,
    path: Path,
    in_place: bool,
    len: usize,
    replays: usize,
) -> Result<()> {
    let s = c.stream.clone();
    let comm = c.comm;
    let graph = {
        let input: &mut CudaSlice<T> = if path == Path::GraphIpc { &mut b.ipc } else { &mut b.pool };
        let out = &mut b.out;
        comm.capture(&s, |s| {
            if in_place {
                comm.all_reduce_in_place_using(Some(algo), &mut input.slice_mut(0..len), s)
            } else {
                comm.all_reduce_using(Some(algo), &input.slice(0..len), &mut out.slice_mut(0..len), s)
            }
        })
        .context("capture")?
    };
    for k in 0..replays {
        let seed = c.next_seed();
        let inputs = Inputs::<T>::new(seed, c.n, len);
        let x = inputs.rank_input(c.rank, len);
        let input: &mut CudaSlice<T> = if path == Path::GraphIpc { &mut b.ipc } else { &mut b.pool };
        s.memcpy_htod(&x, &mut input.slice_mut(0..len))?;
        if !in_place {
            poison(&s, &mut b.out.slice_mut(0..len))?;
        }
        let dest: &mut CudaSlice<T> = if in_place { input } else { &mut b.out };
        let g = guard_poison(&s, dest, len)?;
        graph.launch()?;
        s.synchronize()?;
        comm.check_device_errors().with_context(|| format!("replay {k}"))?;
        let got = read(&s, &dest.slice(0..len))?;
        check_out(&inputs, &got).with_context(|| format!("replay {k}"))?;
        guard_check(&s, dest, len, g).with_context(|| format!("replay {k}"))?;
    }
    Ok(())
}

fn lens_for<T: Element>(max_bytes: usize, quick: bool) -> Vec<usize> {
    let size = std::mem::size_of::<T>();
    let mut bytes: Vec<usize> =
        vec![1, 12, 30, 100, 1000, 4096 + 6, 65536 - 2, (256 << 10) + 2, 512 << 10, MIB + 6, 8 * MIB + 2, 64 * MIB];
    if quick {
        bytes.retain(|&b| b <= 8 * MIB + 2);
    }
    let mut lens: Vec<usize> = bytes.into_iter().filter(|&b| b <= max_bytes).map(|b| (b / size).max(1)).collect();
    lens.dedup();
    lens
}

fn run_dtype<T: Dev>(c: &mut Ctx, tally: &mut Tally, max_bytes: usize, quick: bool) -> Result<()> {
    let max_len = max_bytes / std::mem::size_of::<T>();
    let mut b = Bufs::<T>::new(c, max_len)?;
    let dt = T::DTYPE;
    let packet_bytes = c.comm.config().packet_buffer_bytes;
    for len in lens_for::<T>(max_bytes, quick) {
        let bytes = len * std::mem::size_of::<T>();
        let big = bytes > 8 * MIB + 16;
        for algo in [Algo::OneShot, Algo::TwoShot, Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
            let packet = matches!(algo, Algo::Packet | Algo::PacketTwoPhase | Algo::Lamport);
            if packet && bytes > packet_bytes {
                continue;
            }
            // Packets read only their own memory: registered and staged inputs are one path.
            let paths: &[Path] = if packet {
                &[Path::Staged, Path::GraphPool]
            } else {
                &[Path::Registered, Path::Staged, Path::GraphIpc, Path::GraphPool]
            };
            for &path in paths {
                for in_place in [false, true] {
                    // At 64 MiB keep one path per algorithm and placement, to fit the time.
                    if big && !matches!((algo, path), (Algo::OneShot, Path::Registered) | (Algo::TwoShot, Path::Staged))
                    {
                        continue;
                    }
                    let name = format!("{dt} len={len} {algo} {path:?} in_place={in_place}");
                    let r = match path {
                        Path::Registered | Path::Staged => eager_case(c, &mut b, algo, path, in_place, len),
                        Path::GraphIpc | Path::GraphPool => {
                            let replays = if len * std::mem::size_of::<T>() <= 4096 { 20 } else { 3 };
                            graph_case(c, &mut b, algo, path, in_place, len, replays)
                        }
                    };
                    tally.record(&name, r);
                }
            }
        }
    }
    Ok(())
}

fn expect_err(r: tpcomm::Result<()>, want: fn(&Error) -> bool, what: &str) -> Result<()> {
    match r {
        Ok(()) => Err(anyhow!("{what}: succeeded, an error was expected")),
        Err(e) if want(&e) => Ok(()),
        Err(e) => Err(anyhow!("{what}: wrong error: {e}")),
    }
}

fn bad_inputs(c: &mut Ctx, tally: &mut Tally, max_bytes: usize) -> Result<()> {
    let s = c.stream.clone();
    let mut pool = s.alloc_zeros::<f32>(1024)?;
    let mut out = s.alloc_zeros::<f32>(1024)?;
    let inv = |e: &Error| matches!(e, Error::InvalidArgument { .. });
    tally.record(
        "bad: unregistered input on the registered path",
        expect_err(
            c.comm.all_reduce_registered_using(
                Some(Algo::OneShot),
                &pool.slice(0..256),
                &mut out.slice_mut(0..256),
                &s,
            ),
            inv,
            "unregistered",
        ),
    );
    tally.record(
        "bad: misaligned input",
        expect_err(
            c.comm.all_reduce_using(Some(Algo::OneShot), &pool.slice(1..257), &mut out.slice_mut(0..256), &s),
            inv,
            "misaligned input",
        ),
    );
    tally.record(
        "bad: misaligned output",
        expect_err(
            c.comm.all_reduce_using(Some(Algo::TwoShot), &pool.slice(0..256), &mut out.slice_mut(2..258), &s),
            inv,
            "misaligned output",
        ),
    );
    tally.record(
        "bad: input and output lengths differ",
        expect_err(
            c.comm.all_reduce_using(None, &pool.slice(0..256), &mut out.slice_mut(0..255), &s),
            inv,
            "length mismatch",
        ),
    );
    let over = max_bytes / 4 + 4;
    let big_in = s.alloc_zeros::<f32>(over)?;
    let mut big_out = s.alloc_zeros::<f32>(over)?;
    tally.record(
        "bad: staged message over the staging size",
        expect_err(c.comm.all_reduce_using(Some(Algo::TwoShot), &big_in, &mut big_out, &s), inv, "oversize"),
    );
    // Without a forced algorithm the dispatch table sends it elsewhere (checked bit for bit by
    // the deterministic step): NCCL, chunked custom calls, or a copy for one rank.
    let routed = c.comm.device_algo::<f32>(over).map_err(anyhow::Error::from).and_then(|a| match a {
        Algo::Nccl | Algo::Chunked | Algo::Copy => Ok(()),
        other => Err(anyhow!("a message over the staging size was dispatched to {other}")),
    });
    tally.record("dispatch: over the staging size goes to nccl, chunked or copy", routed);
    for algo in [Algo::Packet, Algo::Lamport] {
        tally.record(
            &format!("bad: misaligned input ({algo})"),
            expect_err(
                c.comm.all_reduce_using(Some(algo), &pool.slice(3..259), &mut out.slice_mut(0..256), &s),
                inv,
                "misaligned input",
            ),
        );
    }
    let over = c.comm.config().packet_buffer_bytes / 4 + 4;
    let (p_in, mut p_out) = (s.alloc_zeros::<f32>(over)?, s.alloc_zeros::<f32>(over)?);
    for algo in [Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
        tally.record(
            &format!("bad: message over the packet buffer ({algo})"),
            expect_err(c.comm.all_reduce_using(Some(algo), &p_in, &mut p_out, &s), inv, "oversize packet"),
        );
    }
    let d64 = s.alloc_zeros::<f64>(64)?;
    let mut o64 = s.alloc_zeros::<f64>(64)?;
    tally.record(
        "bad: f64 (lamport)",
        expect_err(
            c.comm.all_reduce_using(Some(Algo::Lamport), &d64, &mut o64, &s),
            |e| matches!(e, Error::Unsupported { .. }),
            "f64",
        ),
    );
    tally.record(
        "bad: f64",
        expect_err(
            c.comm.all_reduce_using(Some(Algo::OneShot), &d64, &mut o64, &s),
            |e| matches!(e, Error::Unsupported { .. }),
            "f64",
        ),
    );
    // The communicator still works after all of these (they fail before any kernel).
    let inputs = Inputs::<f32>::new(77, c.n, 1000);
    s.memcpy_htod(&inputs.rank_input(c.rank, 1000), &mut pool.slice_mut(0..1000))?;
    let r = c.comm.all_reduce(&pool.slice(0..1000), &mut out.slice_mut(0..1000), &s).map_err(anyhow::Error::from);
    let r = r.and_then(|()| check_out(&inputs, &read(&s, &out.slice(0..1000))?));
    tally.record("bad: communicator still usable afterwards", r);
    Ok(())
}

/// A rank that skips a call of `algo`: the others must see PeerTimeout naming it, within the
/// timeout.
fn skipped_call(
    world: &mpi::topology::SimpleCommunicator,
    config: &Config,
    algo: Algo,
    tally: &mut Tally,
) -> Result<()> {
    let n = world.size() as usize;
    let rank = world.rank() as usize;
    let cfg = Config { timeout: Duration::from_millis(1500), ..config.clone() };
    let comm = Communicator::new(world, cfg)?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let inp = s.alloc_zeros::<f32>(4096)?;
    let mut out = s.alloc_zeros::<f32>(4096)?;
    comm.all_reduce_using(Some(algo), &inp, &mut out, &s)?; // every rank: builds the backend's state
    if rank == 0 && algo == Algo::TwoShot {
        // The first communicator of this process compiled or loaded the module; this one must
        // find it in TPCOMM_CACHE_DIR.
        println!("second communicator: kernels from disk cache: {:?}", comm.kernels_from_disk_cache());
    }
    let skipper = n - 1;
    if rank != skipper {
        let t0 = Instant::now();
        let r = comm.all_reduce_using(Some(algo), &inp, &mut out, &s);
        let took = t0.elapsed();
        let check = match r {
            Err(Error::PeerTimeout { peer: Some(p), .. }) if p == skipper && took < Duration::from_secs(20) => Ok(()),
            Err(e) => Err(anyhow!("expected PeerTimeout naming rank {skipper}, got: {e} after {took:?}")),
            Ok(()) => Err(anyhow!("the call succeeded without rank {skipper}")),
        };
        tally.record(&format!("timeout: a rank skips a call ({algo})"), check);
        tally.record(
            &format!("timeout: the communicator is poisoned afterwards ({algo})"),
            expect_err(
                comm.all_reduce_using(Some(Algo::OneShot), &inp, &mut out, &s),
                |e| matches!(e, Error::Poisoned { .. }),
                "after timeout",
            ),
        );
    }
    world.barrier();
    Ok(())
}

/// Ranks capturing different numbers of calls must all get Error::Mismatch.
fn capture_mismatch(world: &mpi::topology::SimpleCommunicator, config: &Config, tally: &mut Tally) -> Result<()> {
    let rank = world.rank() as usize;
    let comm = Communicator::new(world, config.clone())?;
    let ctx = comm.cuda_context()?;
    // SAFETY: this test uses one stream only; capture must not wait on events of other streams.
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream()?;
    let mut buf = comm.alloc_device::<f32>(4096)?;
    let calls = if rank == 0 { 2 } else { 1 };
    let r = comm.capture(&s, |s| {
        for _ in 0..calls {
            comm.all_reduce_in_place_using(Some(Algo::OneShot), &mut buf.slice_mut(0..4096), s)?;
        }
        Ok(())
    });
    tally.record(
        "graph: ranks captured different numbers of calls",
        expect_err(r.map(|_| ()), |e| matches!(e, Error::Mismatch { .. }), "capture mismatch"),
    );
    world.barrier();
    Ok(())
}

/// Ranks passing different lengths must all get Error::Mismatch (from the kernels' call tags)
/// instead of mixing data. A fresh communicator each time: the error poisons it.
fn length_mismatch(
    world: &mpi::topology::SimpleCommunicator,
    config: &Config,
    algo: Algo,
    tally: &mut Tally,
) -> Result<()> {
    let rank = world.rank() as usize;
    let comm = Communicator::new(world, config.clone())?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let inp = s.alloc_zeros::<f32>(1008)?;
    let mut out = s.alloc_zeros::<f32>(1008)?;
    // Same grid on every rank (one block), different lengths.
    let len = if rank == 0 { 1000 } else { 1008 };
    let r = comm.all_reduce_using(Some(algo), &inp.slice(0..len), &mut out.slice_mut(0..len), &s);
    let name = format!("mismatch: ranks pass different lengths ({algo})");
    tally.record(&name, expect_err(r, |e| matches!(e, Error::Mismatch { .. }), "length mismatch"));
    world.barrier();
    Ok(())
}

/// The long graph run: one capture replayed `replays` times with fresh inputs.
fn many_replays(c: &mut Ctx, tally: &mut Tally, replays: usize) -> Result<()> {
    let len = 3000; // 6000 bytes of bf16: a tail of 0 and an odd number of vectors per rank
    let mut b = Bufs::<bf16>::new(c, len)?;
    for algo in [Algo::OneShot, Algo::TwoShot, Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
        let t0 = Instant::now();
        let r = graph_case(c, &mut b, algo, Path::GraphIpc, false, len, replays);
        if c.rank == 0 {
            println!("graph replays: {replays} x {algo} bf16 len={len} checked in {:.1} s", t0.elapsed().as_secs_f64());
        }
        tally.record(&format!("graph: {replays} replays {algo} bf16 len={len}"), r);
    }
    Ok(())
}

/// One graph of calls of several algorithms and sizes (Lamport after a larger and before a
/// smaller one, LL calls of both parities), replayed `replays` times with fresh inputs: the
/// packet epochs, Lamport generations and re-arming must stay right across algorithms, sizes
/// and replays.
fn mixed_graph(c: &mut Ctx, tally: &mut Tally, replays: usize) -> Result<()> {
    let calls = [
        (Algo::Lamport, 3000usize),
        (Algo::Packet, 1000),
        (Algo::Lamport, 100),
        (Algo::PacketTwoPhase, 5000),
        (Algo::OneShot, 2000),
        (Algo::Lamport, 4001),
        (Algo::Packet, 7),
        (Algo::PacketTwoPhase, 3),
    ];
    // Each call gets its own 16-byte aligned range (8 bf16) of one input and one output buffer.
    let mut offs = Vec::new();
    let mut total = 0;
    for &(_, len) in &calls {
        offs.push(total);
        total += len.div_ceil(8) * 8;
    }
    let s = c.stream.clone();
    let comm = c.comm;
    let mut inp = comm.alloc_device::<bf16>(total)?;
    let mut out = s.alloc_zeros::<bf16>(total)?;
    let graph = comm
        .capture(&s, |st| {
            for (&(algo, len), &o) in calls.iter().zip(&offs) {
                comm.all_reduce_using(Some(algo), &inp.slice(o..o + len), &mut out.slice_mut(o..o + len), st)?;
            }
            Ok(())
        })
        .context("capture")?;
    let t0 = Instant::now();
    let r = (|| -> Result<()> {
        for k in 0..replays {
            let mut all_inputs = Vec::new();
            for (&(_, len), &o) in calls.iter().zip(&offs) {
                let inputs = Inputs::<bf16>::new(c.next_seed(), c.n, len);
                s.memcpy_htod(&inputs.rank_input(c.rank, len), &mut inp.slice_mut(o..o + len))?;
                poison(&s, &mut out.slice_mut(o..o + len))?;
                all_inputs.push(inputs);
            }
            graph.launch()?;
            s.synchronize()?;
            comm.check_device_errors().with_context(|| format!("replay {k}"))?;
            for ((&(algo, len), &o), inputs) in calls.iter().zip(&offs).zip(&all_inputs) {
                let got = read(&s, &out.slice(o..o + len))?;
                check_out(inputs, &got).with_context(|| format!("replay {k}, {algo} len={len}"))?;
            }
        }
        Ok(())
    })();
    if c.rank == 0 {
        println!(
            "mixed graph: {replays} replays of {} calls checked in {:.1} s",
            calls.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    tally.record(&format!("graph: {replays} replays of a mixed packet/Lamport/one-shot graph"), r);
    Ok(())
}

/// NCCL: (a) bit-exact at world size 1 (the sum of one rank is a copy, still checked, and so
/// are the paths around it); (b) refused on every rank, without a hang, where ranks share a GPU.
fn nccl_checks(
    c: &mut Ctx,
    tally: &mut Tally,
    world: &mpi::topology::SimpleCommunicator,
    config: &Config,
) -> Result<()> {
    let ctx = c.comm.cuda_context()?;
    let shared = tpcomm::topology::shared_gpus(world, &ctx);
    if let Some((uuid, ranks)) = shared.first() {
        if c.rank == 0 {
            println!("nccl: ranks {ranks:?} share GPU {uuid}: checking that forced NCCL is refused");
        }
        return nccl_refused_on_shared_gpu(world, config, tally);
    }
    if c.n > 1 {
        if c.rank == 0 {
            println!(
                "nccl: NOT CHECKED bit for bit: {} ranks on their own GPUs, and NCCL's order of addition is not \
                 rank order; run at world size 1 for the exact check",
                c.n
            );
        }
        return Ok(());
    }
    nccl_exact::<f32>(c, tally)?;
    nccl_exact::<bf16>(c, tally)
}

/// (a) Forced NCCL at world size 1: eager out of place and in place, and a graph of one call
/// replayed with fresh inputs, against the reference bits.
fn nccl_exact<T: Dev>(c: &mut Ctx, tally: &mut Tally) -> Result<()> {
    let size = std::mem::size_of::<T>();
    let bytes = [4, 1000, 4096 + 6, MIB + 6, 9 * MIB + 2];
    let max_len = bytes.iter().map(|b| b / size).max().unwrap_or(1) + GUARD;
    let mut b = Bufs::<T>::new(c, max_len)?;
    let dt = T::DTYPE;
    for len in bytes.map(|b| (b / size).max(1)) {
        for in_place in [false, true] {
            let r = eager_case(c, &mut b, Algo::Nccl, Path::Staged, in_place, len);
            tally.record(&format!("nccl: {dt} len={len} eager in_place={in_place}"), r);
        }
        let r = graph_case(c, &mut b, Algo::Nccl, Path::GraphPool, false, len, 3);
        tally.record(&format!("nccl: {dt} len={len} graph"), r);
    }
    Ok(())
}

/// (b) Ranks sharing a GPU: a communicator forced to NCCL returns `Error::Unsupported` naming
/// the duplicate GPU on every rank, within the timeout, and still serves custom calls after.
fn nccl_refused_on_shared_gpu(
    world: &mpi::topology::SimpleCommunicator,
    config: &Config,
    tally: &mut Tally,
) -> Result<()> {
    let n = world.size() as usize;
    let cfg = Config { algo: Some(Algo::Nccl), deterministic: false, ..config.clone() };
    let comm = Communicator::new(world, cfg)?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let inputs = Inputs::<f32>::new(0x9cc1, n, 1000);
    let mut inp = s.alloc_zeros::<f32>(1000)?;
    s.memcpy_htod(&inputs.rank_input(world.rank() as usize, 1000), &mut inp)?;
    let mut out = s.alloc_zeros::<f32>(1000)?;
    let t0 = Instant::now();
    let r = comm.all_reduce(&inp, &mut out, &s);
    let took = t0.elapsed();
    let check = match r {
        Err(Error::Unsupported { reason, .. })
            if reason.contains("duplicate GPU")
                && reason.contains("one rank per GPU")
                && took < Duration::from_secs(20) =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow!("expected Unsupported naming the duplicate GPU, got: {e} after {took:?}")),
        Ok(()) => Err(anyhow!("NCCL ran with ranks sharing a GPU")),
    };
    tally.record("nccl: forced NCCL refused on a shared GPU", check);
    poison(&s, &mut out.slice_mut(0..1000))?;
    let r = comm.all_reduce_using(Some(Algo::OneShot), &inp, &mut out, &s).map_err(anyhow::Error::from);
    let r = r.and_then(|()| check_out(&inputs, &read(&s, &out.slice(0..1000))?));
    tally.record("nccl: communicator still usable after the refusal", r);
    world.barrier();
    Ok(())
}

/// (c) Deterministic mode with a 1 MiB custom limit: large messages go chunked and give the
/// rank-order reference bits, and a probe gives the same bits wherever it is embedded.
fn deterministic_checks(
    c: &mut Ctx,
    tally: &mut Tally,
    world: &mpi::topology::SimpleCommunicator,
    config: &Config,
) -> Result<()> {
    let cfg =
        Config { deterministic: true, algo: None, custom_max_bytes: MIB, oneshot_max_bytes: None, ..config.clone() };
    let det = Communicator::new(world, cfg)?;
    // SAFETY: as for the first communicator: all work is ordered on one stream.
    unsafe { det.cuda_context()?.disable_event_tracking() };
    let mut d = Ctx { comm: &det, stream: c.stream.clone(), n: c.n, rank: c.rank, seed: c.seed + 100_000 };
    deterministic_dtype::<f32>(&mut d, tally)?;
    deterministic_dtype::<bf16>(&mut d, tally)?;
    world.barrier();
    Ok(())
}

fn deterministic_dtype<T: Dev>(d: &mut Ctx, tally: &mut Tally) -> Result<()> {
    let size = std::mem::size_of::<T>();
    let dt = T::DTYPE;
    // Odd element counts of 3 to 5 MiB: a tail that is not a whole chunk nor a whole vector.
    let lens = [3 * MIB / size + 1, 4 * MIB / size + 3, 5 * MIB / size - 1];
    let max_len = 5 * MIB / size + GUARD;
    let mut b = Bufs::<T>::new(d, max_len)?;
    for len in lens {
        let chosen = d.comm.device_algo::<T>(len);
        let r = match chosen {
            Ok(Algo::Chunked) => Ok(()),
            // One rank copies its input: exact, hence deterministic.
            Ok(Algo::Copy) if d.n == 1 => Ok(()),
            other => Err(anyhow!("the dispatch table chose {other:?}, not chunked")),
        };
        tally.record(&format!("deterministic: {dt} len={len} is dispatched chunked (copy for one rank)"), r);
        for (path, in_place) in
            [(Path::Registered, false), (Path::Staged, false), (Path::Staged, true), (Path::Registered, true)]
        {
            let r = eager_case(d, &mut b, Algo::Chunked, path, in_place, len);
            tally.record(&format!("deterministic: {dt} len={len} {path:?} in_place={in_place}"), r);
        }
        for (path, in_place) in [(Path::GraphIpc, false), (Path::GraphPool, true)] {
            let r = graph_case(d, &mut b, Algo::Chunked, path, in_place, len, 2);
            tally.record(&format!("deterministic: {dt} len={len} {path:?} in_place={in_place}"), r);
        }
    }
    let r = probe_invariance::<T>(d, &mut b);
    tally.record(&format!("deterministic: {dt} probe gives the same bits at every offset and size"), r);
    Ok(())
}

/// One probe of every rank, embedded at offsets across chunk boundaries in messages of
/// different sizes and reduced through the dispatch table, gives the probe's reference bits.
fn probe_invariance<T: Dev>(d: &mut Ctx, b: &mut Bufs<T>) -> Result<()> {
    const W: usize = 300_007;
    let size = std::mem::size_of::<T>();
    let probe_seed = d.next_seed();
    let probes: Vec<Vec<T>> = (0..d.n).map(|r| (0..W).map(|i| value(probe_seed, r, i)).collect()).collect();
    let want = reference_sum(&probes.iter().map(|p| &p[..]).collect::<Vec<_>>());
    let chunk = MIB / size;
    let cases = [(W, 0), (W + 1, 1), (3 * MIB / size + 5, chunk - 7), (5 * MIB / size - 1, 2 * chunk - W / 2)];
    let s = d.stream.clone();
    for (len, offset) in cases {
        let filler_seed = d.next_seed();
        let mut x: Vec<T> = (0..len).map(|i| value(filler_seed, d.rank, i)).collect();
        x[offset..offset + W].copy_from_slice(&probes[d.rank]);
        s.memcpy_htod(&x, &mut b.pool.slice_mut(0..len))?;
        poison(&s, &mut b.out.slice_mut(0..len))?;
        let g = guard_poison(&s, &mut b.out, len)?;
        d.comm.all_reduce(&b.pool.slice(0..len), &mut b.out.slice_mut(0..len), &s)?;
        let got = read(&s, &b.out.slice(offset..offset + W))?;
        let wrong = got.iter().zip(&want).filter(|(g, w)| g.to_f64().to_bits() != w.to_f64().to_bits()).count();
        if wrong > 0 {
            return Err(anyhow!("len {len} offset {offset}: {wrong} of {W} probe elements differ from the reference"));
        }
        guard_check(&s, &b.out, len, g).with_context(|| format!("len {len} offset {offset}"))?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Latency of eager calls (launch + wait) and of graph replays, registered bf16 inputs.
fn bench(c: &mut Ctx) -> Result<()> {
    let world = c.comm.bootstrap().world();
    let s = c.stream.clone();
    if c.rank == 0 {
        println!("latency (us per allreduce, bf16, registered input, {} ranks):", c.n);
        println!("{:>10} {:>8} {:>12} {:>12}", "bytes", "algo", "eager", "graph");
    }
    for bytes in [1024usize, 16 << 10, 64 << 10, 256 << 10, MIB, 4 * MIB] {
        if bytes > c.comm.config().custom_max_bytes {
            continue;
        }
        let len = bytes / 2;
        let mut shared = c.comm.alloc_shared::<bf16>(len)?;
        let mut out = s.alloc_zeros::<bf16>(len)?;
        let inputs = Inputs::<bf16>::new(5, c.n, len);
        s.memcpy_htod(&inputs.rank_input(c.rank, len), &mut shared.slice_mut(0..len))?;
        for algo in [Algo::Packet, Algo::Lamport, Algo::OneShot, Algo::TwoShot] {
            if bytes > c.comm.dispatch_table().packet_max_bytes.max(64 << 10)
                && matches!(algo, Algo::Packet | Algo::Lamport)
            {
                continue;
            }
            let mut eager = Vec::new();
            for i in 0..220 {
                world.barrier();
                let t0 = Instant::now();
                c.comm.all_reduce_using(Some(algo), &shared.slice(0..len), &mut out.slice_mut(0..len), &s)?;
                if i >= 20 {
                    eager.push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
            let comm = c.comm;
            let graph = comm.capture(&s, |st| {
                for _ in 0..10 {
                    comm.all_reduce_using(Some(algo), &shared.slice(0..len), &mut out.slice_mut(0..len), st)?;
                }
                Ok(())
            })?;
            graph.launch()?;
            s.synchronize()?;
            let reps = 200;
            world.barrier();
            let t0 = Instant::now();
            for _ in 0..reps {
                graph.launch()?;
            }
            s.synchronize()?;
            let per = t0.elapsed().as_secs_f64() * 1e6 / (reps * 10) as f64;
            comm.check_device_errors()?;
            let got = read(&s, &out.slice(0..len))?;
            check_out(&inputs, &got).context("bench result")?;
            if c.rank == 0 {
                println!("{bytes:>10} {algo:>8} {:>12.2} {per:>12.2}", median(eager));
            }
        }
    }
    Ok(())
}

/// One named part of the check.
type Step<'a> = dyn FnMut(&mut Ctx, &mut Tally) -> Result<()> + 'a;

fn main() -> Result<()> {
    let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI initialised twice"))?;
    let world = universe.world();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let bench_only = args.iter().any(|a| a == "--bench-only");
    let do_bench = bench_only || args.iter().any(|a| a == "--bench");
    let replays: usize = std::env::var("GPU_CHECK_REPLAYS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let config = Config::from_env()?;
    if args.iter().any(|a| a == "--topology") {
        // The node's GPUs and links as tpcomm sees them, then nothing else.
        let comm = Communicator::new(&world, config.clone())?;
        let ctx = comm.cuda_context()?;
        let report = tpcomm::topology::link_report(comm.bootstrap().node(), &ctx);
        if world.rank() == 0 {
            println!("{}\n{report}", comm.bootstrap().summary());
        }
        return Ok(());
    }
    let rank = world.rank() as usize;
    let n = world.size() as usize;
    let mut tally = Tally { rank, passed: 0, failed: 0 };
    let t_start = Instant::now();
    {
        let comm = Communicator::new(&world, config.clone())?;
        let ctx = comm.cuda_context()?;
        // One stream for everything: graph capture must not wait on other streams' events.
        // SAFETY: all work of this program is ordered on `stream` or synchronised explicitly.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        if rank == 0 {
            let nv = tpcomm::cuda::module_cache::nvrtc_version().unwrap_or((0, 0));
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
        let mut c = Ctx { comm: &comm, stream, n, rank, seed: 1 };
        let steps: [(&str, &mut Step); 8] = [
            ("f32", &mut |c, t| run_dtype::<f32>(c, t, max_bytes, quick)),
            ("f16", &mut |c, t| run_dtype::<f16>(c, t, max_bytes, quick)),
            ("bf16", &mut |c, t| run_dtype::<bf16>(c, t, max_bytes, quick)),
            ("bad inputs", &mut |c, t| bad_inputs(c, t, max_bytes)),
            ("replays", &mut |c, t| many_replays(c, t, replays)),
            ("mixed graph", &mut |c, t| mixed_graph(c, t, (replays / 10).max(10))),
            ("nccl", &mut |c, t| nccl_checks(c, t, &world, &config)),
            ("deterministic", &mut |c, t| deterministic_checks(c, t, &world, &config)),
        ];
        for (name, step) in steps {
            if bench_only {
                break;
            }
            let t0 = Instant::now();
            let r = step(&mut c, &mut tally);
            tally.record(&format!("step {name} ran to its end"), r);
            if rank == 0 {
                println!("step {name}: {:.1} s", t0.elapsed().as_secs_f64());
            }
        }
        if rank == 0 {
            println!("first communicator: kernels from disk cache: {:?}", comm.kernels_from_disk_cache());
        }
        if do_bench {
            let r = bench(&mut c);
            tally.record("bench", r);
        }
    }
    if n > 1 && !bench_only {
        for algo in [Algo::TwoShot, Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
            let r = skipped_call(&world, &config, algo, &mut tally);
            tally.record("step timeout ran to its end", r);
        }
        let r = capture_mismatch(&world, &config, &mut tally);
        tally.record("step capture mismatch ran to its end", r);
        for algo in [Algo::OneShot, Algo::TwoShot, Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
            let r = length_mismatch(&world, &config, algo, &mut tally);
            tally.record("step length mismatch ran to its end", r);
        }
    }
    let mine = [tally.passed as u64, tally.failed as u64];
    let mut sum = [0u64; 2];
    world.all_reduce_into(&mine[..], &mut sum[..], SystemOperation::sum());
    if rank == 0 {
        println!(
            "gpu_check {n} ranks: {} passed, {} failed ({:.1} s)",
            sum[0],
            sum[1],
            t_start.elapsed().as_secs_f64()
        );
    }
    if sum[1] > 0 {
        std::process::exit(1);
    }
    Ok(())
}
