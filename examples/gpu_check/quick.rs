//! The quick (quantized) allreduce on the GPU: every codec, f32 / f16 / bf16, one element to
//! 64 MiB, eager and graph, in place and not. The kernel is checked exactly: its bits must be
//! those of the host model (`tpcomm::quant::quick_reference`), every element within the
//! codec's bound of the exact sum, and every rank's result the same bytes.

use crate::harness::*;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::CudaSlice;
use std::hash::{Hash, Hasher};
use tpcomm::quant::{count_outside_bound, quick_reference, Codec};
use tpcomm::{bf16, f16, Algo, CallOptions, Communicator, Config, Element};

type World = mpi::topology::SimpleCommunicator;

/// Element types the quick kernels serve (their accumulator is f32).
pub trait QuickElement: Element<Acc = f32> {}
impl QuickElement for f32 {}
impl QuickElement for f16 {}
impl QuickElement for bf16 {}

/// Same bits, or both NaN (the GPU's NaN payload is its own).
fn same<T: Element>(a: T, b: T) -> bool {
    tpcomm::verify::same_bits(a, b) || (a.to_f64().is_nan() && b.to_f64().is_nan())
}

/// Every rank's input for `seed`: wide magnitudes (2^-6..2^10), either sign, never zero.
fn inputs<T: Element>(seed: u64, n: usize, len: usize) -> Vec<Vec<T>> {
    (0..n).map(|r| tpcomm::verify::rank_input(seed, r, len)).collect()
}

/// The result against the model (bit for bit), the bound, and the other ranks (same bytes).
/// With `--sabotage` one element is corrupted first, so this check must fail.
fn check<T: QuickElement>(c: &Ctx, world: &World, codec: Codec, xs: &[Vec<T>], got: &[T]) -> Result<()> {
    let mut got = got.to_vec();
    if c.sabotage && !got.is_empty() {
        let k = got.len() / 2;
        got[k] = T::from_f64(got[k].to_f64() * 2.0 + 1.0);
    }
    let views: Vec<&[T]> = xs.iter().map(|x| &x[..]).collect();
    let model = quick_reference(codec, &views);
    if let Some(i) = (0..got.len()).find(|&i| !same(got[i], model[i])) {
        let wrong = (0..got.len()).filter(|&i| !same(got[i], model[i])).count();
        return Err(anyhow!(
            "{wrong} of {} elements differ from the host model; first: element {i}: got {:?} model {:?}",
            got.len(),
            got[i],
            model[i]
        ));
    }
    let outside = count_outside_bound(codec, &got, &views);
    if outside > 0 {
        return Err(anyhow!("{outside} of {} elements outside the {codec} bound", got.len()));
    }
    // Every rank holds the same bits: compare a hash of them (SipHash with fixed keys).
    let mut h = std::hash::DefaultHasher::new();
    got.iter().for_each(|v| v.to_f64().to_bits().hash(&mut h));
    let hash = h.finish();
    let all = tpcomm::testing::all_gather_bytes(world, &hash.to_le_bytes())?;
    if let Some(r) = all.iter().position(|h| h[..] != hash.to_le_bytes()) {
        return Err(anyhow!("rank {r} holds other bits than rank {}", c.rank));
    }
    Ok(())
}

/// One eager call (or a captured one replayed `replays` times with fresh inputs).
fn quick_case<T: QuickElement>(
    c: &mut Ctx,
    world: &World,
    buf: &mut (CudaSlice<T>, CudaSlice<T>),
    codec: Codec,
    len: usize,
    in_place: bool,
    replays: usize,
) -> Result<()> {
    let s = c.stream.clone();
    let comm = c.comm;
    let opts = CallOptions::algo(Algo::quick(codec));
    let (input, out) = buf;
    let graph = if replays > 0 {
        Some(comm.capture(&s, |s| {
            if in_place {
                comm.all_reduce_in_place_with(&opts, &mut input.slice_mut(0..len), s)
            } else {
                comm.all_reduce_with(&opts, &input.slice(0..len), &mut out.slice_mut(0..len), s)
            }
        })?)
    } else {
        None
    };
    for k in 0..replays.max(1) {
        let xs = inputs::<T>(c.next_seed(), c.n, len);
        s.memcpy_htod(&xs[c.rank], &mut input.slice_mut(0..len))?;
        let dest = if in_place { &mut *input } else { &mut *out };
        if !in_place {
            poison(&s, &mut dest.slice_mut(0..len))?;
        }
        let g = guard_poison(&s, dest, len)?;
        match &graph {
            Some(g) => g.launch()?,
            None if in_place => comm.all_reduce_in_place_with(&opts, &mut input.slice_mut(0..len), &s)?,
            None => comm.all_reduce_with(&opts, &input.slice(0..len), &mut out.slice_mut(0..len), &s)?,
        }
        comm.synchronize(&s).with_context(|| format!("call {k}"))?;
        let dest: &CudaSlice<T> = if in_place { input } else { out };
        let got = read(&s, &dest.slice(0..len))?;
        check(c, world, codec, &xs, &got).with_context(|| format!("call {k}"))?;
        guard_check(&s, dest, len, g).with_context(|| format!("call {k}"))?;
    }
    Ok(())
}

fn quick_dtype<T: QuickElement>(
    c: &mut Ctx,
    world: &World,
    tally: &mut Tally,
    quick: bool,
    replays: usize,
) -> Result<()> {
    let size = std::mem::size_of::<T>();
    let mut bytes = vec![2, 62, 66, 2000, 4096 + 6, 65536 - 2, MIB + 6, 8 * MIB + 2];
    if !quick && T::DTYPE == tpcomm::DType::BF16 {
        bytes.push(64 * MIB);
    }
    let max_len = bytes.iter().max().copied().unwrap_or(0) / size;
    let mut buf = (c.stream.alloc_zeros::<T>(max_len + 64)?, c.stream.alloc_zeros::<T>(max_len + 64)?);
    let dt = T::DTYPE;
    for b in bytes {
        let len = (b / size).max(1);
        for codec in Codec::ALL {
            for in_place in [false, true] {
                // 64 MiB: one eager call per codec, out of place (the host model costs seconds).
                if b > 8 * MIB + 2 && in_place {
                    continue;
                }
                let name = format!("quick {dt} len={len} {codec} in_place={in_place}");
                tally.record(&format!("{name} eager"), quick_case(c, world, &mut buf, codec, len, in_place, 0));
                if b <= MIB + 6 {
                    let n = if b == 4096 + 6 && dt == tpcomm::DType::BF16 { replays } else { 3 };
                    let r = quick_case(c, world, &mut buf, codec, len, in_place, n);
                    tally.record(&format!("{name} graph x{n}"), r);
                }
            }
        }
    }
    Ok(())
}

/// NaN and infinity in the inputs poison their groups only: the same bits as the model,
/// non-finite there, finite everywhere else.
fn non_finite(c: &mut Ctx, world: &World, tally: &mut Tally) -> Result<()> {
    let len = 1000;
    let mut buf = (c.stream.alloc_zeros::<bf16>(len + 64)?, c.stream.alloc_zeros::<bf16>(len + 64)?);
    for codec in Codec::ALL {
        let mut xs = inputs::<bf16>(c.next_seed(), c.n, len);
        xs[0][100] = bf16::NAN;
        xs[c.n - 1][500] = bf16::INFINITY;
        let s = c.stream.clone();
        s.memcpy_htod(&xs[c.rank], &mut buf.0.slice_mut(0..len))?;
        let opts = CallOptions::algo(Algo::quick(codec));
        let r = c
            .comm
            .all_reduce_with(&opts, &buf.0.slice(0..len), &mut buf.1.slice_mut(0..len), &s)
            .and_then(|()| c.comm.synchronize(&s))
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                let got = read(&s, &buf.1.slice(0..len))?;
                check(c, world, codec, &xs, &got)?;
                let poisoned = |i: usize| i / 32 == 100 / 32 || i / 32 == 500 / 32;
                match (0..len).find(|&i| got[i].to_f64().is_finite() == poisoned(i)) {
                    None => Ok(()),
                    Some(i) => Err(anyhow!("element {i}: {:?} (groups 3 and 15 must be non-finite, no other)", got[i])),
                }
            });
        tally.record(&format!("quick {codec}: NaN and infinity poison their groups only"), r);
    }
    Ok(())
}

/// With `TPCOMM_QUICK` on and a low minimum, the dispatch itself picks the codec.
fn dispatch_picks_quick(c: &mut Ctx, world: &World, config: &Config, tally: &mut Tally) -> Result<()> {
    let cfg = Config { quick: Some(Codec::Int6), quick_min_bytes: Some(4096), ..config.clone() };
    let comm = Communicator::new(world, cfg)?;
    comm.init_device()?;
    let r = (|| -> Result<()> {
        let len = 4096;
        let chosen = comm.device_algo::<bf16>(len)?;
        // One rank has nothing to reduce: the call is a copy, quick or not.
        let want = if c.n == 1 { Algo::Copy } else { Algo::QuickInt6 };
        if chosen != want || (c.n > 1 && comm.device_algo::<bf16>(1024)? == Algo::QuickInt6) {
            return Err(anyhow!("dispatch chose {chosen} at 8 KiB, not {want} (and quick below the minimum?)"));
        }
        let s = comm.cuda_context()?.new_stream()?;
        let xs = inputs::<bf16>(c.next_seed(), c.n, len);
        let mut inp = s.alloc_zeros::<bf16>(len)?;
        let mut out = s.alloc_zeros::<bf16>(len)?;
        s.memcpy_htod(&xs[c.rank], &mut inp)?;
        comm.all_reduce(&inp, &mut out, &s)?;
        comm.synchronize(&s)?;
        let got = read(&s, &out.slice(0..len))?;
        if c.n == 1 {
            let same = got.iter().zip(&xs[0]).all(|(g, x)| g.to_bits() == x.to_bits());
            return if same { Ok(()) } else { Err(anyhow!("one rank: the copy differs from the input")) };
        }
        check(c, world, Codec::Int6, &xs, &got)
    })();
    tally.record("quick: TPCOMM_QUICK=int6 makes the dispatch choose it above its minimum", r);
    comm.finalize()?;
    Ok(())
}

/// Every quick check.
pub fn quick_checks(
    c: &mut Ctx,
    world: &World,
    config: &Config,
    tally: &mut Tally,
    quick: bool,
    replays: usize,
) -> Result<()> {
    quick_dtype::<bf16>(c, world, tally, quick, replays)?;
    quick_dtype::<f16>(c, world, tally, quick, replays)?;
    quick_dtype::<f32>(c, world, tally, quick, replays)?;
    non_finite(c, world, tally)?;
    dispatch_picks_quick(c, world, config, tally)
}
