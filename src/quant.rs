//! Quantized allreduce codecs (quick allreduce): the host model of the device kernels.
//!
//! A message is cut into groups of [`GROUP`] consecutive elements; a group travels as one code
//! per element and one f32 scale. The two-shot allreduce quantizes every rank's input (stage 1),
//! sums the decoded values in rank order in f32, quantizes that sum again (stage 2) and decodes
//! it. [`quick_reference`] computes that result on the host with the same IEEE f32 steps as the
//! device kernel, so device results compare bit for bit; [`error_bound`] says how far from the
//! exact sum any result of the codec may be.
//!
//! Every step is plain IEEE f32, round to nearest even, no fused multiply-add. Do not rewrite
//! an expression, even into an equal one: the kernel must keep giving the same bits.

use crate::dtype::{DType, Element};
use std::fmt;
use std::str::FromStr;

/// Elements per quantization group (one scale each).
pub const GROUP: usize = crate::runtime::protocol::QUICK_GROUP;

/// A quantization codec of quick allreduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// FP8 e4m3 codes times a per-group scale (the group's abs-max maps to 448).
    Fp8,
    /// 8-bit integers, q = 128.
    Int8,
    /// 6-bit integers, q = 32.
    Int6,
    /// 4-bit integers, q = 8.
    Int4,
}

impl Codec {
    /// Every codec, in a fixed order.
    pub const ALL: [Codec; 4] = [Codec::Fp8, Codec::Int8, Codec::Int6, Codec::Int4];

    /// The name used on the command line and in benchmark output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Codec::Fp8 => "fp8",
            Codec::Int8 => "int8",
            Codec::Int6 => "int6",
            Codec::Int4 => "int4",
        }
    }

    /// The range of an int codec: code `c` stands for `c - q`, in `-q..q`. `None` for FP8.
    pub const fn q(self) -> Option<u32> {
        match self {
            Codec::Fp8 => None,
            Codec::Int8 => Some(128),
            Codec::Int6 => Some(32),
            Codec::Int4 => Some(8),
        }
    }

    /// Bits per code on the wire.
    pub const fn code_bits(self) -> u32 {
        match self {
            Codec::Fp8 | Codec::Int8 => 8,
            Codec::Int6 => 6,
            Codec::Int4 => 4,
        }
    }

    /// Bytes of one group on the wire: the packed codes and the f32 scale.
    pub const fn wire_bytes_per_group(self) -> usize {
        GROUP * self.code_bits() as usize / 8 + 4
    }

    /// Bytes one rank sends per stage for `len` elements (a partial group costs a whole one).
    pub const fn wire_bytes(self, len: usize) -> usize {
        len.div_ceil(GROUP) * self.wire_bytes_per_group()
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Codec::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown codec {s:?}: expected fp8, int8, int6 or int4"))
    }
}

/// One encoded group: a code per element and the group's scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    /// One code per element, unpacked (int codecs: `c + q`; FP8: the e4m3 bits).
    pub codes: [u8; GROUP],
    /// What decoding multiplies by: 0 for a zero group, NaN for a group that held a NaN or an
    /// infinity (so it decodes to NaN everywhere).
    pub scale: f32,
}

/// 2^k for the exponents of normal f32 numbers, exactly.
fn pow2(k: i32) -> f32 {
    f32::from_bits(((127 + k) as u32) << 23)
}

/// Encodes one group. A group with a NaN or an infinity is poisoned (NaN scale, codes 0); a
/// group whose extreme is 0, or whose step is so small that it or its reciprocal leaves f32's
/// range (a group abs-max below about 2^-119), is a zero group (scale 0).
pub fn encode(codec: Codec, x: [f32; GROUP]) -> Group {
    if x.iter().any(|v| !v.is_finite()) {
        return Group { codes: [0; GROUP], scale: f32::from_bits(0x7FC0_0000) };
    }
    let mx = x.iter().fold(x[0], |m, &v| if v > m { v } else { m });
    let mn = x.iter().fold(x[0], |m, &v| if v < m { v } else { m });
    // The signed extreme: int codecs map it exactly to -q, whatever its sign.
    let e = if mx >= -mn { mx } else { mn };
    let d = match codec.q() {
        Some(q) => e * (-1.0 / q as f32),
        None => mx.max(-mn) / 448.0,
    };
    // One division per group: elements are scaled by the step's reciprocal.
    let inv = 1.0 / d;
    if e == 0.0 || d == 0.0 || !inv.is_finite() {
        let zero = codec.q().map_or(0, |q| q as u8);
        return Group { codes: [zero; GROUP], scale: 0.0 };
    }
    let mut codes = [0u8; GROUP];
    for (code, &v) in codes.iter_mut().zip(&x) {
        *code = match codec.q() {
            Some(q) => {
                let qf = q as f32;
                let w = (v * inv).max(-qf).min(qf - 1.0);
                (w.round_ties_even() as i32 + q as i32) as u8
            }
            None => e4m3(v * inv),
        };
    }
    Group { codes, scale: d }
}

/// Decodes one group: `(code - q) * scale` for int codecs, `e4m3_to_f32(code) * scale` for FP8.
pub fn decode(codec: Codec, g: &Group) -> [f32; GROUP] {
    let mut v = [0.0f32; GROUP];
    for (out, &c) in v.iter_mut().zip(&g.codes) {
        *out = match codec.q() {
            Some(q) => (c as i32 - q as i32) as f32 * g.scale,
            None => e4m3_to_f32(c) * g.scale,
        };
    }
    v
}

/// The e4m3 code of `w`, rounded to nearest even, saturating at ±448 (never the NaN codes
/// 0x7F, 0xFF).
pub fn e4m3(w: f32) -> u8 {
    let s: u8 = if w.is_sign_negative() { 0x80 } else { 0 };
    let a = w.abs().min(448.0);
    if a < pow2(-6) {
        // Subnormal codes are multiples of 2^-9; 8 * 2^-9 is the smallest normal code, 0x08.
        s | (a * 512.0).round_ties_even() as u8
    } else {
        // Round the f32 mantissa to 3 bits, ties to even; a carry bumps the exponent.
        let b = a.to_bits();
        let r = b + 0x7FFFF + ((b >> 20) & 1);
        let ex = (r >> 23) as i32 - 127;
        s | (((ex + 7) as u8) << 3) | ((r >> 20) & 7) as u8
    }
}

/// The value of e4m3 code `c` (0x80 is -0.0).
pub fn e4m3_to_f32(c: u8) -> f32 {
    let ex = ((c >> 3) & 15) as i32;
    let m = (c & 7) as f32;
    let v = if ex == 0 { m * pow2(-9) } else { (8.0 + m) * pow2(ex - 10) };
    if c & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// The common length of the ranks' inputs (0 for no ranks).
fn common_len<T>(inputs: &[&[T]]) -> usize {
    let n = inputs.first().map_or(0, |x| x.len());
    assert!(inputs.iter().all(|x| x.len() == n), "every rank's input must have the same length");
    n
}

/// What quick allreduce with `codec` returns on every rank for these rank inputs, bit for bit:
/// per group, decode(encode) each rank's values, sum them in rank order in f32, decode(encode)
/// the sum and round it to `T`. Which rank owns which group changes no value, so there are no
/// shards here; one rank follows the same formula.
pub fn quick_reference<T: Element<Acc = f32>>(codec: Codec, inputs: &[&[T]]) -> Vec<T> {
    let n = common_len(inputs);
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(GROUP) {
        let len = (n - start).min(GROUP);
        let mut acc = [0.0f32; GROUP];
        for (r, x) in inputs.iter().enumerate() {
            let mut v = [0.0f32; GROUP];
            for (vi, xi) in v.iter_mut().zip(&x[start..start + len]) {
                *vi = xi.to_acc();
            }
            let dec = decode(codec, &encode(codec, v));
            for (a, d) in acc.iter_mut().zip(dec) {
                *a = if r == 0 { d } else { *a + d };
            }
        }
        // Padding decodes to -0.0 where the step is negative; the kernel zeroes it.
        acc[len..].fill(0.0);
        let res = decode(codec, &encode(codec, acc));
        out.extend(res[..len].iter().map(|&v| T::from_acc(v)));
    }
    out
}

/// [`quick_reference`] for any element type: `None` for `f64`, which has no quick kernel.
pub fn quick_reference_any<T: Element>(codec: Codec, inputs: &[&[T]]) -> Option<Vec<T>> {
    match T::DTYPE {
        DType::F32 => Some(reference_as::<T, f32>(codec, inputs)),
        DType::F16 => Some(reference_as::<T, half::f16>(codec, inputs)),
        DType::BF16 => Some(reference_as::<T, half::bf16>(codec, inputs)),
        DType::F64 => None,
    }
}

/// [`quick_reference`] on `T` seen as `U`, the same type under its concrete name.
fn reference_as<T: Element, U: Element<Acc = f32>>(codec: Codec, inputs: &[&[T]]) -> Vec<T> {
    assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<U>());
    // SAFETY: T and U are the same type (checked above).
    let views: Vec<&[U]> =
        inputs.iter().map(|x| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const U, x.len()) }).collect();
    // SAFETY: as above.
    quick_reference::<U>(codec, &views).into_iter().map(|v| unsafe { std::mem::transmute_copy(&v) }).collect()
}

/// Slack on every f32 rounding and on the f64 reference sum: 16 units of f32 roundoff.
const SLACK: f64 = 1.0 / (1u64 << 20) as f64;
/// What f32's range can add to one quantization: a group whose step's reciprocal overflows is
/// encoded as zeros, and its abs-max is below 448 * 2^-128 < 2^-119 (int codecs: 128 * 2^-128);
/// products in the subnormal range round by at most 2^-150.
const UNDERFLOW: f64 = 1.0 / (1u128 << 118) as f64;

/// The unit roundoff of `T` and half its smallest subnormal (the rounding error floor).
fn rounding_of<T: Element>() -> (f64, f64) {
    match T::DTYPE {
        DType::F32 => (2f64.powi(-24), 2f64.powi(-150)),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
        DType::BF16 => (2f64.powi(-8), 2f64.powi(-134)),
        DType::F64 => (2f64.powi(-53), 0.0),
    }
}

/// The most one quantization of a group with abs-max at most `a` moves an element of magnitude
/// at most `m` (see [`error_bound`]).
fn quant_err(codec: Codec, a: f64, m: f64) -> f64 {
    match codec.q() {
        Some(q) => a / q as f64 + SLACK * a + UNDERFLOW,
        None => m / 16.0 + a / (448.0 * 1024.0) + SLACK * (m + a) + UNDERFLOW,
    }
}

/// The exact sum of element `i` over the ranks, in f64.
fn exact_sum<T: Element>(inputs: &[&[T]], i: usize) -> f64 {
    inputs.iter().map(|x| x[i].to_f64()).sum()
}

/// Per element, how far [`quick_reference`] may be from the exact sum of the inputs (+inf in a
/// group where some rank has a NaN or an infinity: no finite promise there).
///
/// Derivation, per group, for N ranks; `a_r` is rank r's abs-max in the group, `x_ri` its
/// element, `s_i` the exact sum. One quantization with abs-max `a` and element `x`:
/// - int codecs: `d = a/q` exactly (a product by a power of two). With `w = x * (1/d)`,
///   `|w| <= q` (two f32 roundings, 2^-23 q), and the code `c` is within 1 of `w`: rounding
///   errs by 1/2, clamping to `q - 1` by under 1. So `|c d - x| <= a/q`; decoding `c * d`
///   rounds once more, `2^-24 a`.
/// - FP8: e4m3 keeps 3 mantissa bits, so `|w| >= 2^-6` errs by at most `|w|/16`, smaller `w` by
///   `2^-10`; in units of `d = a/448` that is `|x|/16 + a/(448*1024)`, plus the f32 roundings
///   of `d`, `1/d`, `w` and the product, each `2^-24` relative.
///
/// Both get `SLACK * (|x| + a)` (`2^-20`) for the f32 roundings and `UNDERFLOW` (`2^-118`) for
/// groups too small for f32 to scale (encoded as zeros, abs-max below 2^-119) and products in
/// f32's subnormal range. Call this `E(a, |x|)`.
///
/// Stage 1: `acc_i = sum_r dec_ri` with `|dec_ri - x_ri| <= E(a_r, |x_ri|)`, and the f32 sum in
/// rank order errs by at most `(N-1) 2^-24 sum_r |dec_ri|`. So `|acc_i - s_i| <= B1_i` with
/// `B1_i = sum_r E_ri + N SLACK sum_r (|x_ri| + E_ri)`; the slack also covers the rounding of
/// the f64 reference sum. Stage 2 quantizes `acc`, whose abs-max is at most
/// `A = max_i (|s_i| + B1_i)` (at most `sum_r a_r (1 + 1/q)` and usually far less), adding
/// `E(A, |s_i| + B1_i)`. Rounding to `T` adds the unit roundoff `u` of T times the bound on the
/// result, `|s_i| + B1_i + E2_i`, plus half of T's smallest subnormal:
/// `bound_i = B1_i + E2_i + u (|s_i| + B1_i + E2_i) + sub_T / 2`.
pub fn error_bound<T: Element<Acc = f32>>(codec: Codec, inputs: &[&[T]]) -> Vec<f64> {
    let n = common_len(inputs);
    let ranks = inputs.len() as f64;
    let (unit, floor) = rounding_of::<T>();
    let mut bound = vec![f64::INFINITY; n];
    for start in (0..n).step_by(GROUP) {
        let end = (start + GROUP).min(n);
        if inputs.iter().any(|x| x[start..end].iter().any(|v| !v.to_f64().is_finite())) {
            continue;
        }
        let abs_max: Vec<f64> =
            inputs.iter().map(|x| x[start..end].iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max)).collect();
        let (mut stage1, mut mag) = ([0.0f64; GROUP], [0.0f64; GROUP]);
        for i in start..end {
            let (mut errs, mut sizes) = (0.0, 0.0);
            for (x, &a) in inputs.iter().zip(&abs_max) {
                let m = x[i].to_f64().abs();
                let e = quant_err(codec, a, m);
                errs += e;
                sizes += m + e;
            }
            stage1[i - start] = errs + ranks * SLACK * sizes;
            mag[i - start] = exact_sum(inputs, i).abs() + stage1[i - start];
        }
        let acc_max = mag.iter().fold(0.0, |m: f64, &v| m.max(v));
        for ((b, &s1), &m) in bound[start..end].iter_mut().zip(&stage1).zip(&mag) {
            let e2 = quant_err(codec, acc_max, m);
            *b = s1 + e2 + unit * (m + e2) + floor;
        }
    }
    bound
}

/// Elements of `got` farther from the exact sum of `inputs` than [`error_bound`]. A NaN or an
/// infinity counts as outside where the element's group is finite on every rank; where the
/// group held a NaN or an infinity, the element is outside unless it is a NaN or an infinity.
pub fn count_outside_bound<T: Element<Acc = f32>>(codec: Codec, got: &[T], inputs: &[&[T]]) -> usize {
    let n = common_len(inputs);
    assert_eq!(got.len(), n, "length of result and inputs");
    let bound = error_bound(codec, inputs);
    (0..n)
        .filter(|&i| {
            let g = got[i].to_f64();
            // The bound is infinite exactly on the groups with a non-finite input.
            if bound[i].is_infinite() {
                return g.is_finite();
            }
            !g.is_finite() || (g - exact_sum(inputs, i)).abs() > bound[i]
        })
        .count()
}

/// Accuracy of a quantized result against the exact sum, over its finite elements (where the
/// result and the exact sum are finite).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ErrorStats {
    /// The largest `|got - exact|`.
    pub max_abs: f64,
    /// The largest `|got - exact|` divided by its group's abs-max of the exact sum (groups whose
    /// exact sum is all zero are left out): the error in units of the group's scale.
    pub max_rel: f64,
    /// `sqrt(sum err^2 / sum exact^2)` over the message: the error relative to the signal.
    pub rms_rel: f64,
}

/// Measures `got` against the exact (f64) sum of `inputs`, for benchmark columns.
pub fn error_stats<T: Element>(got: &[T], inputs: &[&[T]]) -> ErrorStats {
    let n = common_len(inputs);
    assert_eq!(got.len(), n, "length of result and inputs");
    let exact: Vec<f64> = (0..n).map(|i| exact_sum(inputs, i)).collect();
    let mut stats = ErrorStats::default();
    let (mut err2, mut exact2) = (0.0, 0.0);
    for start in (0..n).step_by(GROUP) {
        let end = (start + GROUP).min(n);
        let group_max = exact[start..end].iter().filter(|v| v.is_finite()).fold(0.0, |m: f64, v| m.max(v.abs()));
        for i in start..end {
            let g = got[i].to_f64();
            if !g.is_finite() || !exact[i].is_finite() {
                continue;
            }
            let err = (g - exact[i]).abs();
            stats.max_abs = stats.max_abs.max(err);
            if group_max > 0.0 {
                stats.max_rel = stats.max_rel.max(err / group_max);
            }
            err2 += err * err;
            exact2 += exact[i] * exact[i];
        }
    }
    stats.rms_rel = if exact2 > 0.0 {
        (err2 / exact2).sqrt()
    } else if err2 == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::SplitMix64;
    use half::{bf16, f16};

    fn views<T>(inputs: &[Vec<T>]) -> Vec<&[T]> {
        inputs.iter().map(|x| &x[..]).collect()
    }

    /// A standard normal sample (Box-Muller).
    fn normal(rng: &mut SplitMix64) -> f64 {
        let unit = |bits: u64| (bits >> 11) as f64 / (1u64 << 53) as f64;
        let u1 = 1.0 - unit(rng.next_u64()); // in (0, 1]: ln stays finite
        let u2 = unit(rng.next_u64());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Rank inputs whose element `i` is `f(rng, i)`, one generator per rank.
    fn make<T: Element>(seed: u64, ranks: usize, len: usize, f: impl Fn(&mut SplitMix64, usize) -> f64) -> Vec<Vec<T>> {
        let rank = |r| {
            let mut rng = SplitMix64::new(seed, r as u64);
            (0..len).map(|i| T::from_f64(f(&mut rng, i))).collect()
        };
        (0..ranks).map(rank).collect()
    }

    fn normal_inputs<T: Element>(seed: u64, ranks: usize, len: usize) -> Vec<Vec<T>> {
        make(seed, ranks, len, |rng, _| normal(rng))
    }

    /// Magnitudes 2^-6..2^10, every second and third group scaled by `down` and `up` on all ranks.
    fn wide_inputs<T: Element>(seed: u64, ranks: usize, len: usize, up: f64, down: f64) -> Vec<Vec<T>> {
        make(seed, ranks, len, |rng, i| rng.value() * [1.0, down, up][(i / GROUP) % 3])
    }

    #[test]
    fn codec_names_and_wire_sizes() {
        for c in Codec::ALL {
            assert_eq!(c.as_str().parse::<Codec>().unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
        }
        let err = "int3".parse::<Codec>().unwrap_err();
        assert!(Codec::ALL.iter().all(|c| err.contains(c.as_str())), "{err}");
        let per_group: Vec<usize> = Codec::ALL.iter().map(|c| c.wire_bytes_per_group()).collect();
        assert_eq!(per_group, [36, 36, 28, 20]);
        assert_eq!([0, 1, 32, 33].map(|n| Codec::Int4.wire_bytes(n)), [0, 20, 20, 40]);
    }

    #[test]
    fn e4m3_round_trips_every_finite_code_and_rounds_ties_to_even() {
        let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7F != 0x7F).collect();
        assert_eq!(codes.len(), 254);
        for &c in &codes {
            let v = e4m3_to_f32(c);
            assert!(v.is_finite());
            assert_eq!(e4m3(v), c, "code {c:#04x} = {v:e}");
        }
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
        // Between neighbouring codes: the midpoint goes to the even code, a hair off it does not.
        for c in 0..0x7Eu8 {
            let (lo, hi) = (e4m3_to_f32(c), e4m3_to_f32(c + 1));
            let mid = (lo + hi) / 2.0;
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(e4m3(mid), even, "midpoint of {c:#04x}");
            assert_eq!(e4m3(-mid), 0x80 | even);
            assert_eq!(e4m3(f32::from_bits(mid.to_bits() - 1)), c);
            assert_eq!(e4m3(f32::from_bits(mid.to_bits() + 1)), c + 1);
        }
        assert_eq!([e4m3(1e6), e4m3(-500.0), e4m3(464.0)], [0x7E, 0xFE, 0x7E]);
    }

    #[test]
    fn int_codecs_keep_the_extreme_exact_and_zero_groups_zero() {
        let mut rng = SplitMix64::new(5, 0);
        for codec in [Codec::Int8, Codec::Int6, Codec::Int4] {
            let q = codec.q().unwrap();
            for huge in [1e30f32, -1e30, bf16::MAX.to_f32(), -bf16::MAX.to_f32(), 5000.0, -5000.0] {
                let mut x = [0f32; GROUP];
                x.iter_mut().for_each(|v| *v = rng.value() as f32);
                x[5] = huge;
                let g = encode(codec, x);
                assert_eq!(g.codes[5], 0, "the extreme is -q");
                let dec = decode(codec, &g);
                assert_eq!(dec[5].to_bits(), huge.to_bits(), "{codec} {huge:e}");
                let step = huge.abs() as f64 / q as f64;
                for (d, v) in dec.iter().zip(&x) {
                    assert!((*d as f64 - *v as f64).abs() <= step * (1.0 + 1e-6), "{codec} {v:e} -> {d:e}");
                }
            }
            // All +0, all -0 and a step that underflows (2^-149 / q) are zero groups.
            for x in [[0.0f32; GROUP], [-0.0; GROUP], [f32::from_bits(1); GROUP]] {
                let g = encode(codec, x);
                assert_eq!((g.codes, g.scale.to_bits()), ([q as u8; GROUP], 0));
                assert!(decode(codec, &g).iter().all(|v| v.to_bits() == 0));
            }
            // Through the whole model, on one rank: the huge value comes back exactly.
            let mut x: Vec<bf16> = (0..40).map(|_| bf16::from_f64(rng.value())).collect();
            x[3] = bf16::MAX;
            let out = quick_reference(codec, &[&x[..]]);
            assert_eq!(out[3], bf16::MAX);
            assert_eq!(count_outside_bound(codec, &out, &[&x[..]]), 0);
            let mut y: Vec<f32> = (0..40).map(|_| rng.value() as f32).collect();
            y[35] = -1e30;
            let out = quick_reference(codec, &[&y[..]]);
            assert_eq!(out[35], -1e30);
            assert_eq!(count_outside_bound(codec, &out, &[&y[..]]), 0);
        }
    }

    #[test]
    fn bf16_near_its_max_on_two_ranks_stays_finite() {
        // Rank 1 cancels part of rank 0 (or adds a small value), so every exact sum is finite.
        let mut rng = SplitMix64::new(9, 0);
        let max = bf16::MAX.to_f64();
        let unit = |rng: &mut SplitMix64| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut x0 = Vec::new();
        let mut x1 = Vec::new();
        for i in 0..256 {
            let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            let a = bf16::from_f64(sign * max * (0.5 + 0.5 * unit(&mut rng)));
            let b = if i % 4 == 3 { rng.value().abs() * sign } else { -a.to_f64() * unit(&mut rng) };
            x0.push(a);
            x1.push(bf16::from_f64(b));
        }
        x0[7] = bf16::MAX;
        let inputs = [&x0[..], &x1[..]];
        for codec in Codec::ALL {
            let out = quick_reference(codec, &inputs);
            assert!(out.iter().all(|v| v.is_finite()), "{codec}");
            assert_eq!(count_outside_bound(codec, &out, &inputs), 0, "{codec}");
        }
    }

    /// Wide-magnitude data within the bound. Per codec: the largest error / bound of an element,
    /// and the largest (max error / max bound) of a case.
    fn check_wide<T: Element<Acc = f32>>(seed: u64, up: f64, down: f64) -> [(f64, f64); 4] {
        let mut tightness = [(0.0f64, 0.0f64); 4];
        for (k, codec) in Codec::ALL.into_iter().enumerate() {
            for ranks in 1..=8 {
                for len in [1, 31, 32, 33, 1000, 4097] {
                    let inputs = wide_inputs::<T>(seed, ranks, len, up, down);
                    let inputs = views(&inputs);
                    let out = quick_reference(codec, &inputs);
                    let outside = count_outside_bound(codec, &out, &inputs);
                    assert_eq!(outside, 0, "{codec} {:?} ranks {ranks} len {len}", T::DTYPE);
                    let bound = error_bound(codec, &inputs);
                    let (mut max_err, mut max_bound) = (0.0f64, 0.0f64);
                    for (i, (o, b)) in out.iter().zip(&bound).enumerate() {
                        let err = (o.to_f64() - exact_sum(&inputs, i)).abs();
                        tightness[k].0 = tightness[k].0.max(err / b);
                        (max_err, max_bound) = (max_err.max(err), max_bound.max(*b));
                    }
                    tightness[k].1 = tightness[k].1.max(max_err / max_bound);
                }
            }
        }
        eprintln!("{:?} (fp8, int8, int6, int4) (error / bound, max error / max bound): {tightness:.3?}", T::DTYPE);
        tightness
    }

    #[test]
    fn random_wide_data_stays_within_a_tight_bound() {
        let runs = [
            check_wide::<bf16>(11, 2f64.powi(40), 2f64.powi(-40)),
            check_wide::<f32>(12, 2f64.powi(40), 2f64.powi(-40)),
            // f32 subnormals: the underflow term of the bound.
            check_wide::<f32>(13, 1.0, 2f64.powi(-130)),
            // f16 overflows past 65504, so its groups scale within its range (and into subnormals).
            check_wide::<f16>(14, 2.0, 2f64.powi(-10)),
        ];
        for &(element, case) in runs.iter().flatten() {
            assert!(element >= 0.1 && case >= 0.1, "the bound is loose: {element} {case}");
        }
    }

    #[test]
    fn non_finite_inputs_poison_only_their_group() {
        let g = encode(Codec::Int8, [f32::NAN; GROUP]);
        assert_eq!((g.codes, g.scale.to_bits()), ([0; GROUP], 0x7FC0_0000));
        let mut inputs = normal_inputs::<bf16>(21, 3, 150);
        inputs[1][40] = bf16::NAN;
        inputs[0][100] = bf16::INFINITY;
        inputs[2][101] = bf16::NEG_INFINITY;
        inputs[2][130] = bf16::INFINITY;
        let inputs = views(&inputs);
        let poisoned = |i: usize| matches!(i / GROUP, 1 | 3 | 4);
        for codec in Codec::ALL {
            let out = quick_reference(codec, &inputs);
            for (i, v) in out.iter().enumerate() {
                assert_eq!(v.is_finite(), !poisoned(i), "{codec} element {i}: {v}");
            }
            let bound = error_bound(codec, &inputs);
            assert!(bound.iter().enumerate().all(|(i, b)| b.is_infinite() == poisoned(i)));
            assert_eq!(count_outside_bound(codec, &out, &inputs), 0, "{codec}");
            // A finite value where the input was not finite is a wrong answer.
            let mut wrong = out.clone();
            wrong[45] = bf16::ZERO;
            assert_eq!(count_outside_bound(codec, &wrong, &inputs), 1);
        }
    }

    #[test]
    fn the_checker_catches_wrong_results() {
        let (len, k) = (1000, 123);
        let inputs = normal_inputs::<bf16>(31, 2, len);
        let inputs = views(&inputs);
        for codec in Codec::ALL {
            let out = quick_reference(codec, &inputs);
            assert_eq!(count_outside_bound(codec, &out, &inputs), 0, "{codec}");
            let bound = error_bound(codec, &inputs);
            let mut bad = out.clone();
            bad[k] = bf16::from_f64(exact_sum(&inputs, k) + 2.0 * bound[k]);
            assert_eq!(count_outside_bound(codec, &bad, &inputs), 1, "{codec} off by 2x the bound");
            bad[k] = bf16::NAN;
            assert_eq!(count_outside_bound(codec, &bad, &inputs), 1, "{codec} NaN");
            let dropped = quick_reference(codec, &inputs[..1]);
            let caught = count_outside_bound(codec, &dropped, &inputs);
            eprintln!("{codec}: dropping one of 2 ranks is caught in {caught} of {len} elements");
            assert!(caught > len / 5, "{codec}: only {caught} of {len}");
        }
    }

    #[test]
    fn accuracy_on_normal_data() {
        let len = 1 << 16;
        for ranks in [2, 8] {
            let inputs = normal_inputs::<bf16>(41, ranks, len);
            let inputs = views(&inputs);
            for codec in Codec::ALL {
                let out = quick_reference(codec, &inputs);
                assert_eq!(count_outside_bound(codec, &out, &inputs), 0, "{codec}");
                let s = error_stats(&out, &inputs);
                let (abs, rel, rms) = (s.max_abs, s.max_rel, 100.0 * s.rms_rel);
                eprintln!("bf16 normal, {ranks} ranks, {codec}: max abs {abs:.4}, max rel {rel:.4}, rms rel {rms:.3}%");
                match codec.q() {
                    Some(q) => {
                        let expected = 0.0075 * 128.0 / q as f64;
                        assert!(s.rms_rel > expected / 2.0 && s.rms_rel < expected * 2.0, "{codec} {s:?}");
                    }
                    None => assert!(s.rms_rel < 0.06, "{codec} {s:?}"),
                }
            }
        }
    }
}
