//! The kernel matrix and the error cases: every device path against the reference bits, graph
//! replays, bad inputs, timeouts, mismatches, NCCL and deterministic mode.

use crate::harness::*;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::CudaSlice;
use mpi::topology::Communicator as _;
use mpi::traits::*;
use std::time::{Duration, Instant};
use tpcomm::verify::reference_sum;
use tpcomm::{bf16, Algo, CallOptions, Communicator, Config, DeviceBuffer, Element, Error};

type World = mpi::topology::SimpleCommunicator;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Path {
    Registered,
    Staged,
    GraphIpc,
    GraphPool,
}

/// Per-dtype device buffers, allocated once at the largest size.
pub struct Bufs<T> {
    pub shared: DeviceBuffer<T>,
    pub ipc: DeviceBuffer<T>,
    pub pool: CudaSlice<T>,
    pub out: CudaSlice<T>,
}

impl<T: Element> Bufs<T> {
    /// Every kind of buffer, `len` elements each (collective: `alloc_shared` registers).
    pub fn new(c: &Ctx, len: usize) -> Result<Self> {
        Ok(Bufs {
            shared: c.comm.alloc_shared::<T>(len)?,
            ipc: c.comm.alloc_device::<T>(len)?,
            pool: c.stream.alloc_zeros::<T>(len)?,
            out: c.stream.alloc_zeros::<T>(len)?,
        })
    }

    fn input(&mut self, path: Path) -> &mut dyn Buf<T> {
        match path {
            Path::Registered => &mut self.shared,
            Path::GraphIpc => &mut self.ipc,
            _ => &mut self.pool,
        }
    }
}

/// One eager call (registered or staged), in place or not, checked after synchronising.
fn eager_case<T: Element>(
    c: &mut Ctx,
    b: &mut Bufs<T>,
    algo: impl Into<Option<Algo>>,
    path: Path,
    in_place: bool,
    len: usize,
) -> Result<()> {
    let seed = c.next_seed();
    let inputs = Inputs::<T>::new(seed, c.n, len);
    let x = inputs.rank_input(c.rank, len);
    let s = c.stream.clone();
    let registered_only = path == Path::Registered;
    let algo = algo.into();
    let opts = CallOptions { algo, registered_only, ..Default::default() };
    let input = b.input(path);
    s.memcpy_htod(&x, &mut input.view_mut(0..len))?;
    if in_place {
        let g = guard_poison(&s, input, len)?;
        c.comm.all_reduce_in_place_with(
            &CallOptions { algo, ..Default::default() },
            &mut input.view_mut(0..len),
            &s,
        )?;
        c.comm.synchronize(&s)?;
        let got = read(&s, &input.view(0..len))?;
        check_out(c, &inputs, &got)?;
        return guard_check(&s, input, len, g);
    }
    poison(&s, &mut b.out.slice_mut(0..len))?;
    let g = guard_poison(&s, &mut b.out, len)?;
    let Bufs { shared, pool, out, .. } = b;
    let input: &dyn Buf<T> = if path == Path::Registered { shared } else { pool };
    c.comm.all_reduce_with(&opts, &input.view(0..len), &mut out.slice_mut(0..len), &s)?;
    c.comm.synchronize(&s)?;
    let got = read(&s, &b.out.slice(0..len))?;
    check_out(c, &inputs, &got)?;
    guard_check(&s, &b.out, len, g)
}

/// Capture one call into a graph (under a registration), then replay it `replays` times with
/// fresh inputs.
pub fn graph_case<T: Element>(
    c: &mut Ctx,
    b: &mut Bufs<T>,
    algo: impl Into<Option<Algo>>,
    path: Path,
    in_place: bool,
    len: usize,
    replays: usize,
) -> Result<()> {
    let s = c.stream.clone();
    let comm = c.comm;
    let opts = CallOptions { algo: algo.into(), ..Default::default() };
    let graph = {
        let Bufs { ipc, pool, out, .. } = b;
        let input: &mut dyn Buf<T> = if path == Path::GraphIpc { ipc } else { pool };
        comm.capture(&s, |s| {
            if in_place {
                comm.all_reduce_in_place_with(&opts, &mut input.view_mut(0..len), s)
            } else {
                comm.all_reduce_with(&opts, &input.view(0..len), &mut out.slice_mut(0..len), s)
            }
        })
        .context("capture")?
    };
    for k in 0..replays {
        let seed = c.next_seed();
        let inputs = Inputs::<T>::new(seed, c.n, len);
        let x = inputs.rank_input(c.rank, len);
        s.memcpy_htod(&x, &mut b.input(path).view_mut(0..len))?;
        if !in_place {
            poison(&s, &mut b.out.slice_mut(0..len))?;
        }
        let dest: &mut dyn Buf<T> = if in_place { b.input(path) } else { &mut b.out };
        let g = guard_poison(&s, dest, len)?;
        graph.launch()?;
        comm.synchronize(&s).with_context(|| format!("replay {k}"))?;
        let got = read(&s, &dest.view(0..len))?;
        check_out(c, &inputs, &got).with_context(|| format!("replay {k}"))?;
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

/// Every IPC algorithm, every path, in place and not, sizes from one element to the staging
/// size.
pub fn run_dtype<T: Element>(c: &mut Ctx, tally: &mut Tally, max_bytes: usize, quick: bool) -> Result<()> {
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
                            let replays = if bytes <= 4096 { 20 } else { 3 };
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

/// Bad calls every rank refuses alike before anything is sent: typed errors, and the
/// communicator stays usable.
pub fn consistent_refusals(c: &mut Ctx, tally: &mut Tally, max_bytes: usize) -> Result<()> {
    let s = c.stream.clone();
    let usage = |e: &Error| matches!(e, Error::InvalidUsage { .. });
    let unsupported = |e: &Error| matches!(e, Error::Unsupported { .. });
    let over = max_bytes / 4 + 4;
    let big_in = s.alloc_zeros::<f32>(over)?;
    let mut big_out = s.alloc_zeros::<f32>(over)?;
    for algo in [Algo::OneShot, Algo::TwoShot] {
        tally.record(
            &format!("refused: {algo} over the staging size"),
            expect_err(c.comm.all_reduce_with(&CallOptions::algo(algo), &big_in, &mut big_out, &s), usage, "oversize"),
        );
    }
    // Without a forced algorithm the dispatch sends it elsewhere: NCCL, chunked calls, a copy.
    let routed = c.comm.device_algo::<f32>(over).map_err(anyhow::Error::from).and_then(|a| match a {
        Algo::Nccl | Algo::Chunked | Algo::Copy => Ok(()),
        other => Err(anyhow!("a message over the staging size was dispatched to {other}")),
    });
    tally.record("dispatch: over the staging size goes to nccl, chunked or copy", routed);
    let over = c.comm.config().packet_buffer_bytes / 4 + 4;
    let (p_in, mut p_out) = (s.alloc_zeros::<f32>(over)?, s.alloc_zeros::<f32>(over)?);
    for algo in [Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
        tally.record(
            &format!("refused: message over the packet buffer ({algo})"),
            expect_err(
                c.comm.all_reduce_with(&CallOptions::algo(algo), &p_in, &mut p_out, &s),
                usage,
                "oversize packet",
            ),
        );
    }
    let d64 = s.alloc_zeros::<f64>(64)?;
    let mut o64 = s.alloc_zeros::<f64>(64)?;
    for algo in [Algo::Lamport, Algo::OneShot] {
        tally.record(
            &format!("refused: f64 ({algo})"),
            expect_err(c.comm.all_reduce_with(&CallOptions::algo(algo), &d64, &mut o64, &s), unsupported, "f64"),
        );
    }
    if c.n > 1 {
        tally.record(
            "refused: forced copy with several ranks",
            expect_err(c.comm.all_reduce_with(&CallOptions::algo(Algo::Copy), &p_in, &mut p_out, &s), usage, "copy"),
        );
    }
    tally.record(
        "refused: a host algorithm on device memory",
        expect_err(c.comm.all_reduce_with(&CallOptions::algo(Algo::HostOneShot), &p_in, &mut p_out, &s), usage, "host"),
    );
    // The communicator still works after all of these (they fail before any kernel).
    let inputs = Inputs::<f32>::new(77, c.n, 1000);
    let mut pool = s.alloc_zeros::<f32>(1024)?;
    let mut out = s.alloc_zeros::<f32>(1024)?;
    s.memcpy_htod(&inputs.rank_input(c.rank, 1000), &mut pool.slice_mut(0..1000))?;
    let r = c.comm.all_reduce(&pool.slice(0..1000), &mut out.slice_mut(0..1000), &s).map_err(anyhow::Error::from);
    let r = r
        .and_then(|()| Ok(c.comm.synchronize(&s)?))
        .and_then(|()| check_out(c, &inputs, &read(&s, &out.slice(0..1000))?));
    tally.record("refusals: communicator still usable afterwards", r);
    Ok(())
}

/// A rank passes a bad argument (only it knows: misaligned or mismatched buffers, an input
/// outside registered memory): it gets InvalidArgument, the group fails at once, the peers stop
/// without waiting out the timeout, and every later call on every rank is an error. A fresh
/// communicator per case (each poisons its group).
pub fn local_bad_arguments(world: &World, config: &Config, tally: &mut Tally) -> Result<()> {
    let rank = world.rank() as usize;
    let n = world.size() as usize;
    let cfg = Config { timeout: Duration::from_secs(20), ..config.clone() };
    for case in ["misaligned input", "output shorter than input", "unregistered input on the registered path"] {
        let comm = Communicator::new(world, cfg.clone())?;
        comm.init_device()?;
        let ctx = comm.cuda_context()?;
        let s = ctx.new_stream()?;
        let pool = s.alloc_zeros::<f32>(1024)?;
        let mut out = s.alloc_zeros::<f32>(1024)?;
        let shared = comm.alloc_shared::<f32>(1024)?;
        let bad = rank == n - 1;
        let t0 = Instant::now();
        let r = match (case, bad) {
            ("misaligned input", true) => comm.all_reduce_with(
                &CallOptions::algo(Algo::OneShot),
                &pool.slice(1..257),
                &mut out.slice_mut(0..256),
                &s,
            ),
            ("output shorter than input", true) => comm.all_reduce(&pool.slice(0..256), &mut out.slice_mut(0..255), &s),
            ("unregistered input on the registered path", true) => comm.all_reduce_with(
                &CallOptions { algo: Some(Algo::OneShot), registered_only: true, ..Default::default() },
                &pool.slice(0..256),
                &mut out.slice_mut(0..256),
                &s,
            ),
            _ => comm
                .all_reduce_with(
                    &CallOptions { algo: Some(Algo::OneShot), registered_only: true, ..Default::default() },
                    &shared.slice(0..256),
                    &mut out.slice_mut(0..256),
                    &s,
                )
                .and_then(|()| comm.synchronize(&s)),
        };
        let took = t0.elapsed();
        let check = match (bad, &r) {
            (true, Err(Error::InvalidArgument { .. })) => Ok(()),
            // The peers' kernels see the fault word and stop at once, not after 20 s.
            (false, Err(Error::Poisoned { cause }))
                if cause.contains(&format!("rank {}", n - 1)) && took < Duration::from_secs(5) =>
            {
                Ok(())
            }
            (false, Ok(())) if n == 1 => Ok(()),
            _ => Err(anyhow!("{case}: {} got {r:?} after {took:?}", if bad { "the bad rank" } else { "a peer" })),
        };
        tally.record(&format!("bad argument: {case} fails the group at once"), check);
        let later = comm.all_reduce(&shared.slice(0..256), &mut out.slice_mut(0..256), &s);
        let later = if n == 1 && !bad {
            Ok(())
        } else {
            expect_err(later, |e| matches!(e, Error::Poisoned { .. }), "later call")
        };
        tally.record(&format!("bad argument: {case}: every later call an error"), later);
        drop(comm);
        world.barrier();
    }
    Ok(())
}

/// How [`skipped_call`] makes its calls.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SkipForm {
    /// Out of place on pool memory.
    OutOfPlace,
    /// In place on a buffer from `alloc_shared` (two-shot then stores into the peers' buffers
    /// directly).
    InPlaceRegistered,
    /// `all_reduce_add_rms_norm` fused into `algo` (one-shot or two-shot), in place on a buffer
    /// from `alloc_shared`, rows of 128.
    FusedNorm,
}

/// A rank that skips a call of `algo`: the others learn it from `synchronize` (the kernels time
/// out and record it) as PeerTimeout naming it, within the timeout; the skipping rank's next
/// call, made after that, must be an error and never pair with what its peers abandoned (the
/// silent wrong result the LL and Lamport paths once gave). `form` says how the calls are made.
pub fn skipped_call(world: &World, config: &Config, algo: Algo, form: SkipForm, tally: &mut Tally) -> Result<()> {
    let n = world.size() as usize;
    let rank = world.rank() as usize;
    let cfg = Config { timeout: Duration::from_millis(1500), ..config.clone() };
    let comm = Communicator::new(world, cfg)?;
    comm.init_device()?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let inp = s.alloc_zeros::<f32>(4096)?;
    let mut out = s.alloc_zeros::<f32>(4096)?;
    let mut shared = comm.alloc_shared::<f32>(4096)?;
    let mut residual = s.alloc_zeros::<f32>(4096)?;
    let weight = s.clone_htod(&[1.0f32; 128])?;
    let opts = match form {
        SkipForm::FusedNorm => CallOptions { algo: Some(algo), norm: tpcomm::Fusion::Fused, ..Default::default() },
        _ => CallOptions::algo(algo),
    };
    let mut call = || match form {
        SkipForm::OutOfPlace => comm.all_reduce_with(&opts, &inp, &mut out, &s),
        SkipForm::InPlaceRegistered => comm.all_reduce_in_place_with(&opts, &mut shared, &s),
        SkipForm::FusedNorm => {
            comm.all_reduce_add_rms_norm_in_place_with(&opts, &mut shared, &mut residual, &weight, 1e-6, &s)
        }
    };
    let algo = match form {
        SkipForm::OutOfPlace => algo.to_string(),
        SkipForm::InPlaceRegistered => format!("{algo}, in place, registered"),
        SkipForm::FusedNorm => format!("{algo} + RMSNorm fused, in place, registered"),
    };
    call()?;
    comm.synchronize(&s)?;
    let skipper = n - 1;
    if rank != skipper {
        let t0 = Instant::now();
        let r = call().and_then(|()| comm.synchronize(&s));
        let took = t0.elapsed();
        // The first rank to time out names the rank it waited for and fails the group; in
        // two-phase packets that may be an owner that itself waits for the skipper.
        let check = match &r {
            Err(Error::PeerTimeout { peer: Some(p), .. })
                if (*p == skipper || opts.algo == Some(Algo::PacketTwoPhase)) && took < Duration::from_secs(20) =>
            {
                Ok(())
            }
            Err(Error::Poisoned { .. }) if took < Duration::from_secs(20) => Ok(()),
            Err(e) => Err(anyhow!("expected PeerTimeout naming rank {skipper}, got: {e} after {took:?}")),
            Ok(()) => Err(anyhow!("the call succeeded without rank {skipper}")),
        };
        tally.record(&format!("timeout: a rank skips a call ({algo})"), check);
    }
    world.barrier();
    // Everyone gave up on the skipped call; the skipping rank now makes "its" next call.
    let r = call().and_then(|()| comm.synchronize(&s));
    tally.record(
        &format!("timeout: every later call is an error on every rank ({algo}, rank {rank})"),
        expect_err(r, |e| matches!(e, Error::Poisoned { .. }), "after timeout"),
    );
    world.barrier();
    Ok(())
}

/// Ranks capturing different numbers of calls must all get Error::Mismatch.
pub fn capture_mismatch(world: &World, config: &Config, tally: &mut Tally) -> Result<()> {
    let rank = world.rank() as usize;
    let comm = Communicator::new(world, config.clone())?;
    comm.init_device()?;
    let ctx = comm.cuda_context()?;
    // SAFETY: this test uses one stream only; capture must not wait on events of other streams.
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream()?;
    let mut buf = comm.alloc_device::<f32>(4096)?;
    let calls = if rank == 0 { 2 } else { 1 };
    let r = comm.capture(&s, |s| {
        for _ in 0..calls {
            comm.all_reduce_in_place_with(&CallOptions::algo(Algo::OneShot), &mut buf.slice_mut(0..4096), s)?;
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
/// instead of mixing data. A fresh communicator each time: the error fails the group.
pub fn length_mismatch(world: &World, config: &Config, algo: Algo, tally: &mut Tally) -> Result<()> {
    let rank = world.rank() as usize;
    let comm = Communicator::new(world, config.clone())?;
    comm.init_device()?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let inp = s.alloc_zeros::<f32>(1008)?;
    let mut out = s.alloc_zeros::<f32>(1008)?;
    // Same grid on every rank (one block), different lengths.
    let len = if rank == 0 { 1000 } else { 1008 };
    let r = comm
        .all_reduce_with(&CallOptions::algo(algo), &inp.slice(0..len), &mut out.slice_mut(0..len), &s)
        .and_then(|()| comm.synchronize(&s));
    let name = format!("mismatch: ranks pass different lengths ({algo})");
    // The first rank to see the mismatch fails the group: the others may report that.
    tally.record(
        &name,
        expect_err(r, |e| matches!(e, Error::Mismatch { .. } | Error::Poisoned { .. }), "length mismatch"),
    );
    world.barrier();
    Ok(())
}

/// Ranks whose buffers differ in layout must all get Error::Mismatch, never each other's data:
/// a peer reads (and two-shot writes) each rank's buffers through its own row at its own offset,
/// so rows and offsets are part of the call's tag. Cases: rank 0 at element 0 of a registered
/// buffer and the others 64 bytes in (one-shot); rank 0 in place and the others out of place into
/// a registered output (two-shot, stored directly); a registered input on rank 0 and a staged
/// one elsewhere (one-shot); above a 1 MiB staging size, unforced and in place, a registered
/// buffer on rank 0 (the direct two-shot) and a staged one elsewhere (chunks).
pub fn layout_mismatch(world: &World, config: &Config, case: usize, tally: &mut Tally) -> Result<()> {
    let rank0 = world.rank() == 0;
    let config = match case {
        3 => Config { algo: None, custom_max_bytes: MIB, ..config.clone() },
        _ => config.clone(),
    };
    let comm = Communicator::new(world, config)?;
    comm.init_device()?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let mut shared = comm.alloc_shared::<f32>(2048)?;
    let mut shared_out = comm.alloc_shared::<f32>(1000)?;
    let pool = s.alloc_zeros::<f32>(1000)?;
    let mut out = s.alloc_zeros::<f32>(1000)?;
    let (name, r) = match case {
        0 => {
            let at = if rank0 { 0 } else { 16 };
            let r = comm.all_reduce_with(&CallOptions::algo(Algo::OneShot), &shared.slice(at..at + 1000), &mut out, &s);
            ("other offsets into a registered buffer (oneshot)", r)
        }
        1 => {
            let opts = CallOptions::algo(Algo::TwoShot);
            let r = match rank0 {
                true => comm.all_reduce_in_place_with(&opts, &mut shared.slice_mut(0..1000), &s),
                false => comm.all_reduce_with(&opts, &shared.slice(0..1000), &mut shared_out, &s),
            };
            ("in place on one rank, out of place on the others (twoshot)", r)
        }
        2 => {
            let opts = CallOptions::algo(Algo::OneShot);
            let r = match rank0 {
                true => comm.all_reduce_with(&opts, &shared.slice(0..1000), &mut out, &s),
                false => comm.all_reduce_with(&opts, &pool, &mut out, &s),
            };
            ("a registered input on one rank, staged on the others (oneshot)", r)
        }
        _ => {
            // f32: 3 MiB and a tail, above the packet and staging sizes. alloc_shared is
            // collective: every rank allocates, rank 0 alone calls on it.
            let len = 3 * MIB / 4 + 3;
            let mut registered = comm.alloc_shared::<f32>(len)?;
            let mut plain = s.alloc_zeros::<f32>(len)?;
            let r = match rank0 {
                true => comm.all_reduce_in_place(&mut registered, &s),
                false => comm.all_reduce_in_place(&mut plain, &s),
            };
            ("beyond staging, registered in place on one rank, staged on the others (twoshot, chunked)", r)
        }
    };
    let r = r.and_then(|()| comm.synchronize(&s));
    // Case 3's kernels may differ in grid as well as tag: a block without a peer block stops at
    // its wait (a timeout, or the fault word another rank raised) instead of on the tag.
    let stopped: fn(&Error) -> bool = match case {
        3 => |e| {
            matches!(
                e,
                Error::Mismatch { .. } | Error::Poisoned { .. } | Error::PeerTimeout { .. } | Error::PeerFailed { .. }
            )
        },
        _ => |e| matches!(e, Error::Mismatch { .. } | Error::Poisoned { .. }),
    };
    tally.record(&format!("mismatch: {name}"), expect_err(r, stopped, "layout mismatch"));
    world.barrier();
    Ok(())
}

/// The long graph run: one capture replayed `replays` times with fresh inputs.
pub fn many_replays(c: &mut Ctx, tally: &mut Tally, replays: usize) -> Result<()> {
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
pub fn mixed_graph(c: &mut Ctx, tally: &mut Tally, replays: usize) -> Result<()> {
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
                comm.all_reduce_with(
                    &CallOptions::algo(algo),
                    &inp.slice(o..o + len),
                    &mut out.slice_mut(o..o + len),
                    st,
                )?;
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
            comm.synchronize(&s).with_context(|| format!("replay {k}"))?;
            for ((&(algo, len), &o), inputs) in calls.iter().zip(&offs).zip(&all_inputs) {
                let got = read(&s, &out.slice(o..o + len))?;
                check_out(c, inputs, &got).with_context(|| format!("replay {k}, {algo} len={len}"))?;
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

/// NCCL: (a) at world size 1, forced NCCL calls give the reference bits (the sum of one rank is
/// a copy, still checked with the paths around it); (b) refused on every rank, without a hang,
/// where ranks share a GPU; (c) several ranks on their own GPUs: not checked here (NCCL's order
/// of addition is not rank order; allreduce_perf checks it within a tolerance): skipped.
pub fn nccl_checks(c: &mut Ctx, tally: &mut Tally, world: &World, config: &Config) -> Result<()> {
    if c.n > 1 && tpcomm::cuda_device_count() < c.n {
        if c.rank == 0 {
            println!(
                "nccl: {} ranks on {} GPU(s): checking that forced NCCL is refused",
                c.n,
                tpcomm::cuda_device_count()
            );
        }
        return nccl_refused_on_shared_gpu(world, config, tally);
    }
    if c.n > 1 {
        tally.skip(
            "nccl: bit-exact",
            "NCCL does not sum in rank order with several ranks (allreduce_perf --compare nccl checks it)",
        );
        return Ok(());
    }
    nccl_exact::<f32>(c, tally)?;
    nccl_exact::<bf16>(c, tally)
}

fn nccl_exact<T: Element>(c: &mut Ctx, tally: &mut Tally) -> Result<()> {
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

/// Ranks sharing a GPU: forcing NCCL gives `Error::Unsupported` naming the duplicate GPU on
/// every rank, within the timeout, and the communicator still serves the IPC kernels after.
fn nccl_refused_on_shared_gpu(world: &World, config: &Config, tally: &mut Tally) -> Result<()> {
    let n = world.size() as usize;
    let cfg = Config { algo: Some(Algo::Nccl), deterministic: false, ..config.clone() };
    let comm = Communicator::new(world, cfg)?;
    let t0 = Instant::now();
    comm.init_device()?;
    let ctx = comm.cuda_context()?;
    let s = ctx.new_stream()?;
    let inputs = Inputs::<f32>::new(0x9cc1, n, 1000);
    let mut inp = s.alloc_zeros::<f32>(1000)?;
    s.memcpy_htod(&inputs.rank_input(world.rank() as usize, 1000), &mut inp)?;
    let mut out = s.alloc_zeros::<f32>(1000)?;
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
    let r = comm.all_reduce_with(&CallOptions::algo(Algo::OneShot), &inp, &mut out, &s).map_err(anyhow::Error::from);
    let r = r.and_then(|()| Ok(comm.synchronize(&s)?));
    let c = Ctx { comm: &comm, stream: s.clone(), n, rank: world.rank() as usize, seed: 0, sabotage: false };
    let r = r.and_then(|()| check_out(&c, &inputs, &read(&s, &out.slice(0..1000))?));
    tally.record("nccl: communicator still usable after the refusal", r);
    world.barrier();
    Ok(())
}

/// Deterministic mode with a 1 MiB custom limit: large messages go chunked and give the
/// rank-order reference bits, and a probe gives the same bits wherever it is embedded.
pub fn deterministic_checks(c: &mut Ctx, tally: &mut Tally, world: &World, config: &Config) -> Result<()> {
    let cfg =
        Config { deterministic: true, algo: None, custom_max_bytes: MIB, oneshot_max_bytes: None, ..config.clone() };
    let det = Communicator::new(world, cfg)?;
    det.init_device()?;
    // SAFETY: as for the first communicator: all work is ordered on one stream.
    unsafe { det.cuda_context()?.disable_event_tracking() };
    let mut d = Ctx {
        comm: &det,
        stream: c.stream.clone(),
        n: c.n,
        rank: c.rank,
        seed: c.seed + 100_000,
        sabotage: c.sabotage,
    };
    deterministic_dtype::<f32>(&mut d, tally)?;
    deterministic_dtype::<bf16>(&mut d, tally)?;
    world.barrier();
    Ok(())
}

fn deterministic_dtype<T: Element>(d: &mut Ctx, tally: &mut Tally) -> Result<()> {
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

/// A 1 MiB custom limit: unforced calls above it on buffers every peer reaches (a registered
/// input in place, captured calls in and out of place) take the direct two-shot, which needs
/// no staging; staged ones still go chunked. Either way the rank-order reference bits.
pub fn beyond_staging_checks(c: &mut Ctx, tally: &mut Tally, world: &World, config: &Config) -> Result<()> {
    let cfg = Config { algo: None, custom_max_bytes: MIB, ..config.clone() };
    let comm = Communicator::new(world, cfg)?;
    comm.init_device()?;
    // SAFETY: as for the first communicator: all work is ordered on one stream.
    unsafe { comm.cuda_context()?.disable_event_tracking() };
    let mut d = Ctx {
        comm: &comm,
        stream: c.stream.clone(),
        n: c.n,
        rank: c.rank,
        seed: c.seed + 200_000,
        sabotage: c.sabotage,
    };
    let len = 3 * MIB / 2 + 5; // bf16: 3 MiB and a tail that is not a whole vector
    let mut b = Bufs::<bf16>::new(&d, len + GUARD)?;
    for (path, in_place) in [(Path::Registered, true), (Path::Registered, false), (Path::Staged, true)] {
        let r = eager_case(&mut d, &mut b, None, path, in_place, len);
        tally.record(&format!("beyond staging: eager {path:?} in_place={in_place}"), r);
    }
    for (path, in_place) in [(Path::GraphIpc, false), (Path::GraphIpc, true), (Path::GraphPool, true)] {
        let r = graph_case(&mut d, &mut b, None, path, in_place, len, 3);
        tally.record(&format!("beyond staging: graph {path:?} in_place={in_place}"), r);
    }
    drop(b);
    comm.finalize()?;
    world.barrier();
    Ok(())
}

/// One probe of every rank, embedded at offsets across chunk boundaries in messages of
/// different sizes and reduced through the dispatch table, gives the probe's reference bits.
fn probe_invariance<T: Element>(d: &mut Ctx, b: &mut Bufs<T>) -> Result<()> {
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
        d.comm.synchronize(&s)?;
        let got = read(&s, &b.out.slice(offset..offset + W))?;
        let wrong = got.iter().zip(&want).filter(|(g, w)| !tpcomm::verify::same_bits(**g, **w)).count();
        if wrong > 0 {
            return Err(anyhow!("len {len} offset {offset}: {wrong} of {W} probe elements differ from the reference"));
        }
        guard_check(&s, &b.out, len, g).with_context(|| format!("len {len} offset {offset}"))?;
    }
    Ok(())
}
