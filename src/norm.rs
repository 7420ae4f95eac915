//! Allreduce fused with residual add and RMSNorm: the end of every tensor-parallel layer.
//!
//! For a `[tokens, hidden]` row-major tensor (f32, f16 or bf16) on every rank,
//! [`Communicator::all_reduce_add_rms_norm`] computes
//!
//! ```text
//! residual_out = all_reduce(input) + residual
//! norm_out     = RMSNorm(residual_out) * weight      (per row of `hidden` elements)
//! ```
//!
//! ## Numerics (the same bits on every rank, whatever the path)
//! - `s_i`, the sum over ranks of element `i`, is [`Communicator::all_reduce`]'s: rank order in
//!   fp32, rounded to the element type once.
//! - `residual_out_i = T(f32(s_i) + f32(residual_i))`: one fp32 addition, rounded once.
//! - The row's sum of squares is taken of the rounded `residual_out` (so `norm_out` is exactly
//!   RMSNorm of `residual_out`), in fp32 with every operation rounded and no fused multiply-add,
//!   in one fixed order: lane `t` (of 512) sums `r_i * r_i` over the elements `i` of its 16-byte
//!   vectors (`(i / (16 / size_of::<T>())) % 512 == t`) in increasing `i`; the lanes are combined
//!   by halving trees, within each group of 32 lanes, then over the 16 group sums.
//! - `inv = 1 / sqrt(sum_of_squares / hidden + eps)`, each operation correctly rounded in fp32.
//! - `norm_out_i = T((f32(residual_out_i) * inv) * f32(weight_i))`, rounded once.
//!
//! [`add_rms_norm_reference`] computes exactly these bits on the host (the tests compare the
//! GPU's results with it bit for bit). NaN and infinity propagate as IEEE arithmetic makes them
//! (a row of zeros with `eps = 0` gives NaN, as `x * rsqrt(0)` does).
//!
//! ## Paths
//! The dispatch either runs a fused kernel, one kernel for the whole op, or the split path (the
//! call's ordinary allreduce into `norm_out`, then tpcomm's own add + norm kernel). The fused
//! kernels: the one-shot with the norm as its epilogue (every block owns whole rows), and the
//! two-shot by pieces of rows (rank s reduces piece s of every row and stores the sum into every
//! rank's `norm_out`, then each rank finishes its rows), which needs an input and `norm_out` every
//! peer reaches (registered, or captured under a registration). Fused where it measured faster
//! (the one-shot up to 2 MiB at 2-4 ranks and 256 KiB at 5-8, the two-shot above it at 5-8 ranks
//! and there in place on rows of 16 KiB or more, within `TPCOMM_FUSED_NORM_MAX_BYTES`), split
//! elsewhere, across nodes, through NCCL and on one
//! rank. Every path gives the bits above. [`CallOptions::norm`] forces one;
//! [`Communicator::last_norm_fused`] says which one the last call took.
//!
//! ## Buffers
//! `input`, `residual`, `norm_out` and `residual_out` have `tokens * hidden` elements, `weight`
//! `hidden`; `hidden * size_of::<T>()` is a multiple of 16 bytes (every model's hidden size is)
//! and every pointer 16-byte aligned. `norm_out` may be `input` and `residual_out` may be
//! `residual` (the in-place forms); no other buffers may overlap, except the ones only read. The
//! registration rules are [`Communicator::all_reduce`]'s: an input in a registered buffer (or
//! captured under a registration) is read in place, others are staged.

use crate::communicator::CallOptions;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::runtime::{protocol, StreamRef};
use crate::runtime::{DevicePtr, DevicePtrMut, Stream};
use crate::Communicator;

/// Lanes of the sum of squares: the threads of one block of the kernels (`kernels/rms_norm.cuh`).
const LANES: usize = protocol::THREADS;
/// Lanes per halving group (a warp's worth).
const GROUP: usize = 32;

/// Fused or split, per call ([`CallOptions::norm`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fusion {
    /// The dispatch chooses (fused where it measured faster).
    #[default]
    Auto,
    /// The fused kernel; an error where it cannot serve the call (saying why).
    Fused,
    /// The allreduce, then tpcomm's add + norm kernel.
    Split,
}

/// What a device call of the fused op carries besides the allreduce's input and output
/// (`norm_out`): device addresses, the row length and epsilon (all zero for calls without it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct NormArgs {
    pub residual: u64,
    pub residual_out: u64,
    pub weight: u64,
    /// Elements per row.
    pub hidden: usize,
    pub eps: f32,
    /// Forced path, if any.
    pub fusion: Fusion,
}

fn halving(v: &mut [f32]) -> f32 {
    let mut n = v.len();
    while n > 1 {
        n /= 2;
        for l in 0..n {
            v[l] += v[l + n];
        }
    }
    v[0]
}

/// The fused op on the host, from the allreduce's result: `(norm_out, residual_out)` with the
/// bits stated in the [module docs](self). `sum` and `residual` hold whole rows of
/// `weight.len()` elements.
///
/// # Panics
/// For an empty `weight`, or lengths that are not whole rows.
pub fn add_rms_norm_reference<T: Element<Acc = f32>>(
    sum: &[T],
    residual: &[T],
    weight: &[T],
    eps: f32,
) -> (Vec<T>, Vec<T>) {
    let hidden = weight.len();
    assert!(hidden > 0 && sum.len() % hidden == 0 && residual.len() == sum.len(), "whole rows of weight.len()");
    let per_vec = protocol::VEC_BYTES / T::DTYPE.size();
    let f = |x: T| x.to_acc();
    // Round to nearest even from f32 (`from_f64` is not correctly rounded for bf16 in `half`:
    // values just above a tie come out one ulp low).
    let t = |x: f32| T::from_acc(x);
    let mut norm_out = Vec::with_capacity(sum.len());
    let mut residual_out = Vec::with_capacity(sum.len());
    for (s, res) in sum.chunks(hidden).zip(residual.chunks(hidden)) {
        let r: Vec<T> = s.iter().zip(res).map(|(&s, &x)| t(f(s) + f(x))).collect();
        let mut lanes = [0f32; LANES];
        for (i, &v) in r.iter().enumerate() {
            let v = f(v);
            lanes[(i / per_vec) % LANES] += v * v;
        }
        let mut groups: Vec<f32> = lanes.chunks_mut(GROUP).map(halving).collect();
        let ss = halving(&mut groups);
        let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
        norm_out.extend(r.iter().zip(weight).map(|(&v, &w)| t((f(v) * inv) * f(w))));
        residual_out.extend(r);
    }
    (norm_out, residual_out)
}

/// The split path's epilogue on host memory (the CPU stand-in's kernel): `norm_out` holds the
/// sums on entry and the normalised rows on return; `residual_out` is written too.
///
/// # Safety
/// Every address is host memory of `len` elements of `dtype` (`weight`: `args.hidden`), laid out
/// as [`check_call`] accepts.
pub(crate) unsafe fn add_rms_norm_host(norm_out: u64, args: &NormArgs, len: usize, dtype: DType) -> Result<()> {
    unsafe fn run<T: Element<Acc = f32>>(norm_out: u64, a: &NormArgs, len: usize) {
        // SAFETY: the caller's contract; copied out first, so the outputs may be inputs.
        let read = |p: u64, n: usize| unsafe { std::slice::from_raw_parts(p as *const T, n) }.to_vec();
        let (y, r) =
            add_rms_norm_reference(&read(norm_out, len), &read(a.residual, len), &read(a.weight, a.hidden), a.eps);
        // SAFETY: as above; the outputs do not overlap each other (checked at the face).
        unsafe {
            std::ptr::copy_nonoverlapping(r.as_ptr(), a.residual_out as *mut T, len);
            std::ptr::copy_nonoverlapping(y.as_ptr(), norm_out as *mut T, len);
        }
    }
    // SAFETY: the caller's contract.
    unsafe {
        match dtype {
            DType::F32 => run::<f32>(norm_out, args, len),
            DType::F16 => run::<half::f16>(norm_out, args, len),
            DType::BF16 => run::<half::bf16>(norm_out, args, len),
            DType::F64 => return Err(unsupported()),
        }
    }
    Ok(())
}

fn unsupported() -> Error {
    Error::Unsupported {
        what: "all_reduce_add_rms_norm of f64".into(),
        reason: "the fused norm is defined for f32, f16 and bf16".into(),
    }
}

/// One buffer of a call: address, elements, and whether the op writes it.
struct Span {
    name: &'static str,
    ptr: u64,
    len: usize,
    written: bool,
}

/// Shapes, epsilon and overlaps of one call, before anything is enqueued (local checks: every
/// rank that makes the same call gets the same verdict).
#[allow(clippy::too_many_arguments)]
fn check_call(
    dtype: DType,
    len: usize,
    hidden: usize,
    eps: f32,
    input: (u64, usize),
    residual: (u64, usize),
    weight: u64,
    norm_out: (u64, usize),
    residual_out: (u64, usize),
) -> Result<()> {
    const OP: &str = "all_reduce_add_rms_norm";
    if dtype == DType::F64 {
        return Err(unsupported());
    }
    let size = dtype.size();
    if hidden == 0 || len % hidden != 0 {
        return Err(Error::invalid(OP, format!("{len} elements are not whole rows of weight's {hidden}")));
    }
    if (hidden * size) % protocol::VEC_BYTES != 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "rows of {hidden} elements are not a multiple of {} bytes; pad the hidden size to a multiple of {}",
                protocol::VEC_BYTES,
                protocol::VEC_BYTES / size
            ),
        ));
    }
    for (name, n) in [("residual", residual.1), ("norm_out", norm_out.1), ("residual_out", residual_out.1)] {
        if n != len {
            return Err(Error::invalid(OP, format!("{name} has {n} elements and input {len}")));
        }
    }
    if !eps.is_finite() || eps < 0.0 {
        return Err(Error::invalid(OP, format!("eps = {eps}: it must be finite and >= 0")));
    }
    let spans = [
        Span { name: "input", ptr: input.0, len, written: false },
        Span { name: "residual", ptr: residual.0, len, written: false },
        Span { name: "weight", ptr: weight, len: hidden, written: false },
        Span { name: "norm_out", ptr: norm_out.0, len, written: true },
        Span { name: "residual_out", ptr: residual_out.0, len, written: true },
    ];
    let allowed = |a: &str, b: &str| matches!((a, b), ("input", "norm_out") | ("residual", "residual_out"));
    for (i, a) in spans.iter().enumerate() {
        if a.ptr % protocol::ALIGN as u64 != 0 {
            return Err(Error::invalid(OP, format!("{} is not {}-byte aligned", a.name, protocol::ALIGN)));
        }
        for b in &spans[i + 1..] {
            let overlap = a.ptr < b.ptr + (b.len * size) as u64 && b.ptr < a.ptr + (a.len * size) as u64;
            let same = a.ptr == b.ptr && a.len == b.len && allowed(a.name, b.name);
            if overlap && (a.written || b.written) && !same {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{} and {} overlap; only norm_out = input and residual_out = residual may share memory",
                        a.name, b.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Communicator {
    /// `residual_out = all_reduce(input) + residual; norm_out = RMSNorm(residual_out) * weight`
    /// per row of `weight.len()` elements (device memory, f32 / f16 / bf16; numerics and buffer
    /// rules in [`crate::norm`]). Enqueued on `stream`, like [`Communicator::all_reduce`].
    ///
    /// # Collective
    /// Every rank, same lengths, element type and options.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for shapes that are not whole rows, a row that is not a
    /// multiple of 16 bytes, a negative or non-finite `eps`, or overlapping buffers;
    /// [`Error::Unsupported`] for f64; otherwise as [`Communicator::all_reduce`].
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_add_rms_norm<T, I, R, W, N, O>(
        &self,
        input: &I,
        residual: &R,
        weight: &W,
        eps: f32,
        norm_out: &mut N,
        residual_out: &mut O,
        stream: &Stream,
    ) -> Result<()>
    where
        T: Element,
        I: DevicePtr<T>,
        R: DevicePtr<T>,
        W: DevicePtr<T>,
        N: DevicePtrMut<T>,
        O: DevicePtrMut<T>,
    {
        self.all_reduce_add_rms_norm_with(
            &CallOptions::default(),
            input,
            residual,
            weight,
            eps,
            norm_out,
            residual_out,
            stream,
        )
    }

    /// The in-place form engines use: `x` holds the layer's partial output and becomes the
    /// normalised output; `residual` becomes `all_reduce(x) + residual`.
    ///
    /// # Collective
    /// As [`Communicator::all_reduce_add_rms_norm`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_add_rms_norm`].
    pub fn all_reduce_add_rms_norm_in_place<T, X, R, W>(
        &self,
        x: &mut X,
        residual: &mut R,
        weight: &W,
        eps: f32,
        stream: &Stream,
    ) -> Result<()>
    where
        T: Element,
        X: DevicePtrMut<T>,
        R: DevicePtrMut<T>,
        W: DevicePtr<T>,
    {
        self.all_reduce_add_rms_norm_in_place_with(&CallOptions::default(), x, residual, weight, eps, stream)
    }

    /// As [`Communicator::all_reduce_add_rms_norm`] with per-call options (a forced algorithm for
    /// the allreduce, [`CallOptions::norm`] for the path).
    ///
    /// # Collective
    /// As [`Communicator::all_reduce_add_rms_norm`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_add_rms_norm`]; [`Error::InvalidUsage`] for
    /// [`Fusion::Fused`] where the fused kernel cannot serve the call.
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_add_rms_norm_with<T, I, R, W, N, O>(
        &self,
        opts: &CallOptions,
        input: &I,
        residual: &R,
        weight: &W,
        eps: f32,
        norm_out: &mut N,
        residual_out: &mut O,
        stream: &Stream,
    ) -> Result<()>
    where
        T: Element,
        I: DevicePtr<T>,
        R: DevicePtr<T>,
        W: DevicePtr<T>,
        N: DevicePtrMut<T>,
        O: DevicePtrMut<T>,
    {
        let lens = (input.len(), residual.len(), weight.len(), norm_out.len(), residual_out.len());
        let (i, _a) = input.device_ptr(stream);
        let (r, _b) = residual.device_ptr(stream);
        let (w, _c) = weight.device_ptr(stream);
        let (y, _d) = norm_out.device_ptr_mut(stream);
        let (ro, _e) = residual_out.device_ptr_mut(stream);
        let bufs = NormBuffers {
            input: (i, lens.0),
            residual: (r, lens.1),
            weight: (w, lens.2),
            norm_out: (y, lens.3),
            residual_out: (ro, lens.4),
        };
        // SAFETY: every address comes from device memory of the length beside it, kept
        // alive (and its stream order recorded) by the guards above until the call is enqueued.
        unsafe { self.norm_call(opts, &bufs, eps, T::DTYPE, StreamRef::Device(stream)) }
    }

    /// As [`Communicator::all_reduce_add_rms_norm_in_place`] with per-call options.
    ///
    /// # Collective
    /// As [`Communicator::all_reduce_add_rms_norm`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_add_rms_norm_with`].
    pub fn all_reduce_add_rms_norm_in_place_with<T, X, R, W>(
        &self,
        opts: &CallOptions,
        x: &mut X,
        residual: &mut R,
        weight: &W,
        eps: f32,
        stream: &Stream,
    ) -> Result<()>
    where
        T: Element,
        X: DevicePtrMut<T>,
        R: DevicePtrMut<T>,
        W: DevicePtr<T>,
    {
        let (n, nr, nw) = (x.len(), residual.len(), weight.len());
        let (xp, _a) = x.device_ptr_mut(stream);
        let (r, _b) = residual.device_ptr_mut(stream);
        let (w, _c) = weight.device_ptr(stream);
        let bufs = NormBuffers {
            input: (xp, n),
            residual: (r, nr),
            weight: (w, nw),
            norm_out: (xp, n),
            residual_out: (r, nr),
        };
        // SAFETY: as in all_reduce_add_rms_norm_with.
        unsafe { self.norm_call(opts, &bufs, eps, T::DTYPE, StreamRef::Device(stream)) }
    }

    /// Whether the dispatch fuses a call of `len` elements of `T` in rows of `hidden` (`true`:
    /// the fused kernel; `false`: allreduce then the norm kernel), with aligned buffers, in place
    /// or not, that no peer reaches (plain device memory): buffers every peer reaches may also
    /// take the fused two-shot at 5-8 ranks, which [`Communicator::last_norm_fused`] reports
    /// after the call.
    ///
    /// # Errors
    /// As the call's dispatch would fail; [`Error::InvalidUsage`] before `init_device`.
    pub fn norm_is_fused<T: Element>(&self, len: usize, hidden: usize, in_place: bool) -> Result<bool> {
        let norm = crate::plan::NormRequest { hidden, fusion: Fusion::Auto };
        self.plan_device(len, T::DTYPE, in_place, Some(norm)).map(|p| p.fused())
    }

    /// # Safety
    /// Every address in `bufs` is valid for its length of `dtype` in the memory `stream`
    /// reaches, until the call ran.
    pub(crate) unsafe fn norm_call(
        &self,
        opts: &CallOptions,
        bufs: &NormBuffers,
        eps: f32,
        dtype: DType,
        stream: StreamRef,
    ) -> Result<()> {
        let len = bufs.input.1;
        let hidden = bufs.weight.1;
        let checked = check_call(
            dtype,
            len,
            hidden,
            eps,
            bufs.input,
            bufs.residual,
            bufs.weight.0,
            bufs.norm_out,
            bufs.residual_out,
        );
        if let Err(e) = checked {
            return self.refuse(e);
        }
        let args = NormArgs {
            residual: bufs.residual.0,
            residual_out: bufs.residual_out.0,
            weight: bufs.weight.0,
            hidden,
            eps,
            fusion: opts.norm,
        };
        // SAFETY: the caller's contract.
        unsafe { self.device_call(opts, bufs.input.0, bufs.norm_out.0, len, dtype, stream, Some(args)) }
    }
}

/// The buffers of one call: (address, elements).
pub(crate) struct NormBuffers {
    pub input: (u64, usize),
    pub residual: (u64, usize),
    pub weight: (u64, usize),
    pub norm_out: (u64, usize),
    pub residual_out: (u64, usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::SplitMix64;
    use half::bf16;

    fn data<T: Element>(seed: u64, n: usize) -> Vec<T> {
        let mut g = SplitMix64::new(seed, 7);
        (0..n).map(|_| T::from_f64(g.value())).collect()
    }

    #[test]
    fn the_reference_is_rmsnorm_within_rounding_and_takes_the_stated_order() {
        for hidden in [8usize, 128, 4096, 4104, 8192, 16384] {
            let rows = 3;
            let s: Vec<bf16> = data(1, rows * hidden);
            let r: Vec<bf16> = data(2, rows * hidden);
            let w: Vec<bf16> = data(3, hidden);
            let (y, ro) = add_rms_norm_reference(&s, &r, &w, 1e-6);
            for row in 0..rows {
                let x: Vec<f64> =
                    (0..hidden).map(|i| s[row * hidden + i].to_f64() + r[row * hidden + i].to_f64()).collect();
                let ms = x.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
                let inv = 1.0 / (ms + 1e-6).sqrt();
                for i in 0..hidden {
                    let k = row * hidden + i;
                    assert!((ro[k].to_f64() - x[i]).abs() <= x[i].abs() * 2f64.powi(-8), "residual {k}");
                    let want = x[i] * inv * w[i].to_f64();
                    // Two bf16 roundings (residual_out, norm_out) and fp32 arithmetic.
                    assert!((y[k].to_f64() - want).abs() <= want.abs() * 2f64.powi(-6) + 1e-30, "norm {k}");
                }
            }
        }
    }

    #[test]
    fn the_sum_of_squares_order_is_the_kernels_not_a_sequential_one() {
        // Values whose squares lose bits when summed in one sequence: the lane split and the
        // trees give another result, so a kernel summing in another order fails the GPU tests.
        let hidden = 4096;
        let s: Vec<f32> = (0..hidden).map(|i| if i % 97 == 0 { 4096.0 } else { 1.0 + i as f32 * 1e-3 }).collect();
        let r = vec![0f32; hidden];
        let w = vec![1f32; hidden];
        let (y, _) = add_rms_norm_reference(&s, &r, &w, 0.0);
        let seq: f32 = s.iter().fold(0f32, |a, v| a + v * v);
        let inv_seq = 1.0 / (seq / hidden as f32).sqrt();
        assert!(s.iter().zip(&y).any(|(v, got)| (v * inv_seq).to_bits() != got.to_bits()));
    }

    #[test]
    fn bad_shapes_eps_and_overlaps_are_refused() {
        let a = 1u64 << 20;
        let n = 4096;
        let ok =
            |input, res, w, y, ro| check_call(DType::BF16, n, 1024, 1e-5, (input, n), (res, n), w, (y, n), (ro, n));
        let (x, r, w, y, ro) = (a, a + 0x10_0000, a + 0x20_0000, a + 0x30_0000, a + 0x40_0000);
        assert!(ok(x, r, w, y, ro).is_ok());
        assert!(ok(x, r, w, x, r).is_ok(), "the in-place form");
        assert!(ok(x, r, x, y, ro).is_ok(), "weight and input are both only read");
        for (bad, what) in [
            (ok(x, r, w, y, y), "norm_out = residual_out"),
            (ok(x, r, w, r, ro), "norm_out = residual"),
            (ok(x, r, w, ro - 4096, ro), "norm_out overlaps residual_out"),
            (ok(x, r, w, x + 16, ro), "norm_out overlaps input, not equal to it"),
            (ok(x, r, w, y, x), "residual_out = input"),
            (ok(x, r, y, y, ro), "weight inside norm_out"),
            (ok(x + 8, r, w, y, ro), "misaligned"),
        ] {
            assert!(matches!(bad, Err(Error::InvalidArgument { .. })), "{what}: {bad:?}");
        }
        let shape =
            |len, hidden, eps| check_call(DType::BF16, len, hidden, eps, (x, len), (r, len), w, (y, len), (ro, len));
        assert!(shape(4100, 1025, 1e-5).is_err(), "rows of 1025 bf16 are not 16-byte multiples");
        assert!(shape(4096, 1000, 1e-5).is_err(), "not whole rows");
        assert!(shape(4096, 0, 1e-5).is_err());
        assert!(shape(4096, 1024, -1.0).is_err());
        assert!(shape(4096, 1024, f32::NAN).is_err());
        assert!(shape(4096, 1024, 0.0).is_ok());
        let r64 = check_call(DType::F64, n, 1024, 1e-5, (x, n), (r, n), w, (y, n), (ro, n));
        assert!(matches!(r64, Err(Error::Unsupported { .. })));
    }
}
