//! The fused allreduce + residual add + RMSNorm against the host reference, bit for bit: fused
//! and split paths, registered and staged inputs, in place and not, eager and graph replays of
//! fresh inputs (one graph replayed 1,000 times, 100 with `--quick`), edge values of eps; the
//! fused two-shot (forced) on buffers every peer reaches, and refused where they do not; a rank
//! passing another row length fails on every rank.

use crate::harness::*;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::CudaSlice;
use mpi::topology::Communicator as _;
use tpcomm::verify::{add_rms_norm_reference, reference_sum, same_bits};
use tpcomm::{bf16, f16, Algo, CallOptions, Communicator, Config, DeviceBuffer, Element, Error, Fusion};

type World = mpi::topology::SimpleCommunicator;

/// Buffers at the largest size of one dtype.
struct NormBufs<T> {
    shared: DeviceBuffer<T>,
    /// norm_out every peer reaches (the fused two-shot's, out of place).
    shared_out: DeviceBuffer<T>,
    pool: CudaSlice<T>,
    residual: CudaSlice<T>,
    weight: CudaSlice<T>,
    norm_out: CudaSlice<T>,
    residual_out: CudaSlice<T>,
}

/// One case's data: every rank's input, the (replicated) residual, the weight, and the expected
/// outputs.
struct Case<T> {
    mine: Vec<T>,
    residual: Vec<T>,
    weight: Vec<T>,
    want_norm: Vec<T>,
    want_residual: Vec<T>,
}

impl<T: Element<Acc = f32>> Case<T> {
    fn new(seed: u64, n: usize, rank: usize, len: usize, hidden: usize, eps: f32) -> Self {
        let inputs: Vec<Vec<T>> = (0..n).map(|r| (0..len).map(|i| value(seed, r, i)).collect()).collect();
        let views: Vec<&[T]> = inputs.iter().map(|x| &x[..]).collect();
        let sum = reference_sum(&views);
        // The residual stream is the same on every rank (tensor parallelism replicates it), so
        // every rank's outputs must be the same bits.
        let residual: Vec<T> = (0..len).map(|i| value(seed ^ 0x5e5, 99, i)).collect();
        let weight: Vec<T> = (0..hidden).map(|i| value(seed ^ 0x3e3, 98, i)).collect();
        let (want_norm, want_residual) = add_rms_norm_reference(&sum, &residual, &weight, eps);
        Case { mine: inputs[rank].clone(), residual, weight, want_norm, want_residual }
    }
}

fn compare<T: Element>(c: &Ctx, what: &str, got: &[T], want: &[T]) -> Result<()> {
    let mut got = got.to_vec();
    if c.sabotage && !got.is_empty() {
        let k = got.len() / 3;
        got[k] = T::from_f64(got[k].to_f64() * 2.0 + 1.0);
    }
    let wrong: Vec<usize> = (0..want.len()).filter(|&i| !same_bits(got[i], want[i])).collect();
    match wrong.first() {
        None => Ok(()),
        Some(&i) => Err(anyhow!(
            "{what}: {} of {} elements differ from the reference; first {i}: got {:?} expected {:?}",
            wrong.len(),
            want.len(),
            got[i],
            want[i]
        )),
    }
}

/// How one call is made.
#[derive(Clone, Copy, Debug)]
struct Way {
    fusion: Fusion,
    /// The allreduce forced to two-shot (norm_out in `shared_out` out of place).
    twoshot: bool,
    registered: bool,
    in_place: bool,
    graph: bool,
}

/// One call (or one capture replayed `replays` times, each with fresh data) checked.
#[allow(clippy::too_many_arguments)]
fn run_case<T: Element<Acc = f32>>(
    c: &mut Ctx,
    b: &mut NormBufs<T>,
    way: Way,
    tokens: usize,
    hidden: usize,
    eps: f32,
    replays: usize,
) -> Result<()> {
    let len = tokens * hidden;
    let s = c.stream.clone();
    let comm = c.comm;
    let algo = way.twoshot.then_some(Algo::TwoShot);
    let opts = CallOptions { norm: way.fusion, algo, ..Default::default() };
    let NormBufs { shared, shared_out, pool, residual, weight, norm_out, residual_out } = b;
    let input: &mut dyn Buf<T> = if way.registered { shared } else { pool };
    let norm_out: &mut dyn Buf<T> = if way.twoshot { shared_out } else { norm_out };
    // The call, on whichever buffers `way` names.
    let call = |input: &mut dyn Buf<T>,
                residual: &mut CudaSlice<T>,
                weight: &CudaSlice<T>,
                norm_out: &mut dyn Buf<T>,
                residual_out: &mut CudaSlice<T>,
                s: &std::sync::Arc<cudarc::driver::CudaStream>|
     -> tpcomm::Result<()> {
        let w = weight.slice(0..hidden);
        if way.in_place {
            comm.all_reduce_add_rms_norm_in_place_with(
                &opts,
                &mut input.view_mut(0..len),
                &mut residual.slice_mut(0..len),
                &w,
                eps,
                s,
            )
        } else {
            comm.all_reduce_add_rms_norm_with(
                &opts,
                &input.view(0..len),
                &residual.slice(0..len),
                &w,
                eps,
                &mut norm_out.view_mut(0..len),
                &mut residual_out.slice_mut(0..len),
                s,
            )
        }
    };
    let load = |c: &mut Ctx,
                input: &mut dyn Buf<T>,
                residual: &mut CudaSlice<T>,
                weight_dev: Option<&mut CudaSlice<T>>,
                norm_out: &mut dyn Buf<T>,
                residual_out: &mut CudaSlice<T>|
     -> Result<Case<T>> {
        let case = Case::<T>::new(c.next_seed(), c.n, c.rank, len, hidden, eps);
        s.memcpy_htod(&case.mine, &mut input.view_mut(0..len))?;
        s.memcpy_htod(&case.residual, &mut residual.slice_mut(0..len))?;
        if let Some(w) = weight_dev {
            s.memcpy_htod(&case.weight, &mut w.slice_mut(0..hidden))?;
        }
        poison(&s, &mut norm_out.view_mut(0..len))?;
        poison(&s, &mut residual_out.slice_mut(0..len))?;
        Ok(case)
    };
    let check = |c: &Ctx,
                 case: &Case<T>,
                 input: &dyn Buf<T>,
                 residual: &CudaSlice<T>,
                 norm_out: &dyn Buf<T>,
                 residual_out: &CudaSlice<T>|
     -> Result<()> {
        let (y, r) = if way.in_place {
            (read(&s, &input.view(0..len))?, read(&s, &residual.slice(0..len))?)
        } else {
            (read(&s, &norm_out.view(0..len))?, read(&s, &residual_out.slice(0..len))?)
        };
        compare(c, "norm_out", &y, &case.want_norm)?;
        compare(c, "residual_out", &r, &case.want_residual)
    };
    if !way.graph {
        let case = load(c, input, residual, Some(weight), norm_out, residual_out)?;
        call(input, residual, weight, norm_out, residual_out, &s)?;
        comm.synchronize(&s)?;
        return check(c, &case, input, residual, norm_out, residual_out);
    }
    // The graph captures addresses: every replay reads fresh inputs, residual and weight.
    let graph = comm.capture(&s, |s| call(input, residual, weight, norm_out, residual_out, s)).context("capture")?;
    for k in 0..replays {
        let case = load(c, input, residual, Some(weight), norm_out, residual_out)?;
        graph.launch()?;
        comm.synchronize(&s).with_context(|| format!("replay {k}"))?;
        check(c, &case, input, residual, norm_out, residual_out).with_context(|| format!("replay {k}"))?;
    }
    Ok(())
}

/// Every dtype, shape and way; `quick` trims the shapes.
pub fn norm_checks(c: &mut Ctx, tally: &mut Tally, quick: bool) -> Result<()> {
    norm_dtype::<bf16>(c, tally, quick)?;
    norm_dtype::<f16>(c, tally, quick)?;
    norm_dtype::<f32>(c, tally, quick)
}

fn norm_dtype<T: Element<Acc = f32>>(c: &mut Ctx, tally: &mut Tally, quick: bool) -> Result<()> {
    // (hidden, tokens): 1 and 3 rows (blocks of one row, fewer rows than blocks), 64 rows
    // (several rows per block: read back after the end barrier in place), 1024 rows of 128 (more
    // rows per block than the fused kernel keeps in place: staged instead), odd row lengths.
    let mut shapes: Vec<(usize, usize)> = Vec::new();
    let hiddens: &[usize] = if quick { &[128, 4104, 8192] } else { &[128, 4096, 4104, 5120, 8192] };
    let tokens: &[usize] = if quick { &[1, 3, 64] } else { &[1, 2, 3, 7, 16, 64, 129, 257] };
    for &h in hiddens {
        shapes.extend(tokens.iter().map(|&t| (h, t)));
    }
    shapes.extend([(128, 1024), (4096, 257)]);
    if !quick {
        shapes.extend([(4096, 1024), (4096, 4096)]);
    }
    let max_len = shapes.iter().map(|&(h, t)| h * t).max().unwrap_or(1);
    let mut b = NormBufs {
        shared: c.comm.alloc_shared::<T>(max_len)?,
        shared_out: c.comm.alloc_shared::<T>(max_len)?,
        pool: c.stream.alloc_zeros::<T>(max_len)?,
        residual: c.stream.alloc_zeros::<T>(max_len)?,
        weight: c.stream.alloc_zeros::<T>(8192)?,
        norm_out: c.stream.alloc_zeros::<T>(max_len)?,
        residual_out: c.stream.alloc_zeros::<T>(max_len)?,
    };
    let max_bytes = c.comm.dispatch_table().custom_max_bytes();
    for &(hidden, t) in &shapes {
        for fusion in [Fusion::Auto, Fusion::Fused, Fusion::Split] {
            for (registered, in_place, graph) in [
                (true, false, false),
                (false, false, false),
                (false, true, false),
                (true, true, false),
                (true, true, true),
                (false, false, true),
            ] {
                let way = Way { fusion, twoshot: false, registered, in_place, graph };
                let name = format!("norm {} hidden {hidden} tokens {t} {way:?}", T::DTYPE);
                let replays = if graph { 3 } else { 1 };
                let r = run_case(c, &mut b, way, t, hidden, 1e-6, replays);
                // One rank, or more bytes than the IPC kernels take: the fused kernel is refused
                // alike on every rank.
                let fusable = c.n > 1 && t * hidden * size_of::<T>() <= max_bytes;
                let r = match (fusion, fusable, r) {
                    (Fusion::Fused, false, Err(e)) if is_usage(&e) => Ok(()),
                    (Fusion::Fused, false, Ok(())) => Err(anyhow!("an unfusable call was fused")),
                    (_, _, r) => r,
                };
                tally.record(&name, r);
            }
        }
        // The fused two-shot, forced: it writes every rank's norm_out, so it serves registered
        // (or captured) inputs and outputs and is refused alike on every rank elsewhere.
        for (registered, in_place, graph) in
            [(true, false, false), (true, true, false), (true, true, true), (true, false, true), (false, false, false)]
        {
            let way = Way { fusion: Fusion::Fused, twoshot: true, registered, in_place, graph };
            let name = format!("norm {} hidden {hidden} tokens {t} {way:?}", T::DTYPE);
            let r = run_case(c, &mut b, way, t, hidden, 1e-6, if graph { 3 } else { 1 });
            let r = match (c.n > 1 && registered, r) {
                (false, Err(e)) if is_usage(&e) => Ok(()),
                (false, Ok(())) => Err(anyhow!("the fused two-shot served buffers a peer cannot reach")),
                (_, r) => r,
            };
            tally.record(&name, r);
        }
    }
    // One graph replayed many times, fresh data before every replay (in place, the engine's form).
    let long = if quick { 100 } else { 1_000 };
    let way = Way { fusion: Fusion::Auto, twoshot: false, registered: true, in_place: true, graph: true };
    let r = run_case(c, &mut b, way, 33, 4096, 1e-6, long);
    tally.record(&format!("norm {} graph of 33 x 4096 replayed {long} times", T::DTYPE), r);
    // eps at its edges: 0 (rows are never all zero here) and 1.
    for eps in [0.0f32, 1.0] {
        for fusion in [Fusion::Auto, Fusion::Split] {
            let way = Way { fusion, twoshot: false, registered: false, in_place: false, graph: false };
            let r = run_case(c, &mut b, way, 5, 4096, eps, 1);
            tally.record(&format!("norm {} eps {eps} {fusion:?}", T::DTYPE), r);
        }
    }
    Ok(())
}

fn is_usage(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<Error>(), Some(Error::InvalidUsage { .. }))
}

/// Ranks passing different row lengths for the same element count to the fused kernels (one-shot
/// and two-shot): an error on every rank (a mismatch, or a timeout where the grids differ),
/// never `Ok` with data; every later call fails too.
pub fn hidden_mismatch(world: &World, config: &Config, tally: &mut Tally) -> Result<()> {
    for algo in [None, Some(Algo::TwoShot)] {
        let comm =
            Communicator::new(world, Config { timeout: std::time::Duration::from_millis(2_000), ..config.clone() })?;
        comm.init_device()?;
        let s = comm.cuda_context()?.new_stream()?;
        let hidden = if world.rank() == 0 { 128 } else { 256 };
        let len = 256 * 8;
        let x = comm.alloc_shared::<bf16>(len)?;
        let res = s.alloc_zeros::<bf16>(len)?;
        let w = s.clone_htod(&vec![bf16::from_f32(1.0); hidden])?;
        // norm_out every peer reaches: the fused two-shot writes it on every rank.
        let mut y = comm.alloc_shared::<bf16>(len)?;
        let mut ro = s.alloc_zeros::<bf16>(len)?;
        let opts = CallOptions { norm: Fusion::Fused, algo, ..Default::default() };
        let r = comm
            .all_reduce_add_rms_norm_with(&opts, &x, &res, &w, 1e-6, &mut y, &mut ro, &s)
            .and_then(|()| comm.synchronize(&s));
        let first = expect_err(
            r,
            // The rank that sees the mismatch first fails the group: the others may report that.
            |e| {
                matches!(
                    e,
                    Error::Mismatch { .. }
                        | Error::PeerTimeout { .. }
                        | Error::PeerFailed { .. }
                        | Error::Poisoned { .. }
                )
            },
            "fused call with another row length on rank 0",
        );
        let later = expect_err(
            comm.all_reduce(&x, &mut y, &s).and_then(|()| comm.synchronize(&s)),
            |_| true,
            "the call after the mismatch",
        );
        let what = algo.map_or("oneshot".to_string(), |a| a.to_string());
        tally.record(&format!("norm: ranks disagree on hidden ({what})"), first.and(later));
        let _ = comm.finalize();
    }
    Ok(())
}
