//! What an inference engine does: its own CUDA graph captures under a registration, thousands
//! of captured calls, eager loops that never wait per call, calls on several streams, and
//! communicators built and torn down again and again.

use crate::harness::*;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use mpi::topology::Communicator as _;
use mpi::traits::CommunicatorCollectives as _;
use std::time::Instant;
use tpcomm::{bf16, Algo, CallOptions, Communicator, Config, Error};

type World = mpi::topology::SimpleCommunicator;

/// The engine's own capture: `graphs` graphs of `calls` allreduces each (alternately the
/// dispatch's choice and forced one-shot, which reads its input in place through rank-data
/// rows), captured with cudarc's `begin_capture`/`end_capture` between
/// `begin_graph_registration` and `finish`, each replayed with fresh inputs and every call's
/// result checked.
pub fn own_capture(c: &mut Ctx, tally: &mut Tally, graphs: usize, calls: usize, replays: usize) -> Result<()> {
    const LEN: usize = 256; // 512 bytes each: packets for auto, one-shot when forced
    let s = c.stream.clone();
    let comm = c.comm;
    let mut x = comm.alloc_device::<bf16>(calls * LEN)?;
    let mut y = s.alloc_zeros::<bf16>(calls * LEN)?;
    let t0 = Instant::now();
    let mut captured = 0;
    for g in 0..graphs {
        let reg = comm.begin_graph_registration()?;
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let body = (0..calls).try_for_each(|i| {
            let opts = if i % 2 == 0 { CallOptions::default() } else { CallOptions::algo(Algo::OneShot) };
            let r = i * LEN..(i + 1) * LEN;
            comm.all_reduce_with(&opts, &x.slice(r.clone()), &mut y.slice_mut(r), &s)
        });
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        body.context("capturing")?;
        let graph = reg.finish(graph?)?;
        captured += calls;
        for k in 0..replays {
            let inputs: Vec<Inputs<bf16>> = (0..calls).map(|_| Inputs::new(c.next_seed(), c.n, LEN)).collect();
            let host: Vec<bf16> = inputs.iter().flat_map(|i| i.rank_input(c.rank, LEN)).collect();
            s.memcpy_htod(&host, &mut x)?;
            poison(&s, &mut y.slice_mut(..))?;
            graph.launch()?;
            comm.synchronize(&s).with_context(|| format!("graph {g} replay {k}"))?;
            let out = read(&s, &y.slice(..))?;
            for (i, inp) in inputs.iter().enumerate() {
                check_out(c, inp, &out[i * LEN..(i + 1) * LEN])
                    .with_context(|| format!("graph {g} replay {k} call {i}"))?;
            }
        }
    }
    if c.rank == 0 {
        println!(
            "own capture: {captured} captured calls in {graphs} graphs, {replays} replays each, {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    tally.record(
        &format!("graphs: {captured} calls captured by the engine under registrations, replayed exactly"),
        Ok(()),
    );
    Ok(())
}

/// Captures made and dropped over and over, far more rank-data rows in all than the table has:
/// rows come back with their graphs (`cycles` captures of `calls` one-shot calls reading
/// distinct addresses).
pub fn rows_come_back(c: &mut Ctx, tally: &mut Tally, cycles: usize, calls: usize) -> Result<()> {
    const LEN: usize = 64;
    let s = c.stream.clone();
    let comm = c.comm;
    let mut x = comm.alloc_device::<bf16>(calls * LEN)?;
    let mut y = s.alloc_zeros::<bf16>(calls * LEN)?;
    let t0 = Instant::now();
    let opts = CallOptions::algo(Algo::OneShot);
    let mut last = None;
    for _ in 0..cycles {
        let graph = comm.capture(&s, |st| {
            (0..calls).try_for_each(|i| {
                let r = i * LEN..(i + 1) * LEN;
                comm.all_reduce_with(&opts, &x.slice(r.clone()), &mut y.slice_mut(r), st)
            })
        })?;
        last = Some(graph); // the previous graph drops here
    }
    // The last graph still works.
    let inputs: Vec<Inputs<bf16>> = (0..calls).map(|_| Inputs::new(c.next_seed(), c.n, LEN)).collect();
    let host: Vec<bf16> = inputs.iter().flat_map(|i| i.rank_input(c.rank, LEN)).collect();
    s.memcpy_htod(&host, &mut x)?;
    last.ok_or_else(|| anyhow!("no graph"))?.launch()?;
    comm.synchronize(&s)?;
    let out = read(&s, &y.slice(..))?;
    for (i, inp) in inputs.iter().enumerate() {
        check_out(c, inp, &out[i * LEN..(i + 1) * LEN])?;
    }
    if c.rank == 0 {
        println!(
            "rows: {cycles} captures of {calls} distinct one-shot calls, each dropped, in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    tally.record(&format!("graphs: {} rows' worth of dropped captures reclaimed", cycles * calls), Ok(()));
    Ok(())
}

/// An allreduce captured by the engine without a registration is refused (it would replay with
/// no peer addresses), and the communicator stays usable.
pub fn unregistered_capture_refused(c: &mut Ctx, tally: &mut Tally) -> Result<()> {
    let s = c.stream.clone();
    let x = c.comm.alloc_device::<bf16>(1024)?;
    let mut y = s.alloc_zeros::<bf16>(1024)?;
    for algo in [None, Some(Algo::OneShot), Some(Algo::Packet)] {
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let r = c.comm.all_reduce_with(&CallOptions { algo, ..Default::default() }, &x, &mut y, &s);
        let _ = s.end_capture(CUgraphInstantiate_flags(0));
        tally.record(
            &format!("graphs: a capture without registration is refused ({algo:?})"),
            expect_err(r, |e| matches!(e, Error::InvalidUsage { .. }), "unregistered capture"),
        );
    }
    c.comm.poll()?;
    Ok(())
}

/// Eager loops that never wait: `count` calls of `len` elements enqueued back to back (the
/// dispatch's choice, or forced), each on its own input and output range, on two streams in
/// turn when `two_streams`, then one synchronize, then every result checked.
pub fn eager_loop(
    c: &mut Ctx,
    tally: &mut Tally,
    count: usize,
    len: usize,
    algo: Option<Algo>,
    two_streams: bool,
) -> Result<()> {
    let s = c.stream.clone();
    let other = c.comm.cuda_context()?.new_stream()?;
    let stride = len.div_ceil(8) * 8; // keep every range 16-byte aligned
    let mut x = s.alloc_zeros::<bf16>(count * stride)?;
    let mut y = s.alloc_zeros::<bf16>(count * stride)?;
    let inputs: Vec<Inputs<bf16>> = (0..count).map(|_| Inputs::new(c.next_seed(), c.n, len)).collect();
    let mut host = vec![bf16::ZERO; count * stride];
    for (i, inp) in inputs.iter().enumerate() {
        host[i * stride..i * stride + len].copy_from_slice(&inp.rank_input(c.rank, len));
    }
    s.memcpy_htod(&host, &mut x)?;
    poison(&s, &mut y.slice_mut(..))?;
    s.synchronize()?;
    let opts = CallOptions { algo, ..Default::default() };
    let t0 = Instant::now();
    for i in 0..count {
        let st = if two_streams && i % 2 == 1 { &other } else { &s };
        let r = i * stride..i * stride + len;
        c.comm.all_reduce_with(&opts, &x.slice(r.clone()), &mut y.slice_mut(r), st)?;
    }
    let enqueued = t0.elapsed();
    c.comm.synchronize(&s)?;
    c.comm.synchronize(&other)?;
    let out = read(&s, &y.slice(..))?;
    let r = inputs.iter().enumerate().try_for_each(|(i, inp)| {
        check_out(c, inp, &out[i * stride..i * stride + len]).with_context(|| format!("call {i}"))
    });
    if c.rank == 0 {
        println!(
            "eager loop: {count} x {} bytes ({algo:?}, {} stream(s)) enqueued in {:.1} us per call, all checked after one sync",
            len * 2,
            if two_streams { 2 } else { 1 },
            enqueued.as_secs_f64() * 1e6 / count as f64
        );
    }
    tally.record(
        &format!("eager: {count} calls of {len} elements ({algo:?}, two streams {two_streams}) without a sync between"),
        r,
    );
    Ok(())
}

/// Build, use, finalize and drop a communicator `cycles` times: GPU memory and open file
/// descriptors stay where they were.
pub fn lifecycle(world: &World, config: &Config, tally: &mut Tally, ordinal: usize, cycles: usize) -> Result<()> {
    let fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let ctx = tpcomm::cudarc::driver::CudaContext::new(ordinal)?;
    let mut before = None;
    let t0 = Instant::now();
    for k in 0..cycles {
        let comm = Communicator::builder(world).config(config.clone()).context(ctx.clone()).build()?;
        let s = ctx.new_stream()?;
        let mut x = comm.alloc_shared::<bf16>(4096)?;
        comm.all_reduce_in_place(&mut x, &s)?;
        comm.synchronize(&s)?;
        drop(x);
        comm.finalize()?;
        drop(comm);
        drop(s);
        // Measured after the first cycle (it loads libraries and caches modules), once every
        // rank sharing the GPU has dropped its communicator too.
        if k == 0 {
            world.barrier();
            before = Some((ctx.mem_get_info()?.0, fds()));
        }
    }
    world.barrier();
    let (free_before, fds_before) = before.ok_or_else(|| anyhow!("no cycle ran"))?;
    let (free_after, fds_after) = (ctx.mem_get_info()?.0, fds());
    if world.rank() == 0 {
        println!(
            "lifecycle: {cycles} communicators built, used, finalized and dropped in {:.1} s; free GPU memory {} -> {} MiB, open fds {fds_before} -> {fds_after}",
            t0.elapsed().as_secs_f64(),
            free_before >> 20,
            free_after >> 20
        );
    }
    // Other ranks share the GPU and allocate at their own pace: allow 64 MiB of drift.
    let r = if free_after + (64 << 20) < free_before {
        Err(anyhow!("free GPU memory fell from {} to {} MiB over {cycles} cycles", free_before >> 20, free_after >> 20))
    } else if fds_after > fds_before + 2 {
        Err(anyhow!("open file descriptors grew from {fds_before} to {fds_after} over {cycles} cycles"))
    } else {
        Ok(())
    };
    tally.record(&format!("lifecycle: {cycles} create/finalize/drop cycles, memory and fds stable"), r);
    Ok(())
}
