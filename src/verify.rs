//! Verifiable data for tests and benchmarks, in the spirit of nccl-tests: every rank can
//! regenerate every other rank's input from `(seed, rank)`, so each rank computes the exact
//! expected result of an allreduce and counts wrong elements bit for bit.

pub use crate::dtype::reference_sum;
use crate::dtype::Element;
pub use crate::hierarchy::hierarchical_reference;
pub use crate::norm::add_rms_norm_reference;

/// SplitMix64: a small, fast, well-mixed generator (enough for test data, not for secrets).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for one `(seed, stream)` pair.
    pub fn new(seed: u64, stream: u64) -> Self {
        SplitMix64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A random value of magnitude 1..2 with either sign: for checks within a tolerance, where
    /// every rank's contribution must stand out from rounding.
    pub fn narrow_value(&mut self) -> f64 {
        let bits = self.next_u64();
        let mantissa = 1.0 + (bits >> 11) as f64 / (1u64 << 53) as f64;
        if bits & 0x10 != 0 {
            -mantissa
        } else {
            mantissa
        }
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A random non-zero value of magnitude 2^-6..2^10 with either sign: sums of these round
    /// differently in different orders, so a wrong summation order shows up as wrong bits.
    pub fn value(&mut self) -> f64 {
        let bits = self.next_u64();
        let mantissa = 1.0 + (bits >> 11) as f64 / (1u64 << 53) as f64;
        let exponent = (bits & 0xf) as i32 - 6;
        let sign = if bits & 0x10 != 0 { -1.0 } else { 1.0 };
        sign * mantissa * 2f64.powi(exponent)
    }
}

/// The input of `rank` for test `(seed, len)`.
pub fn rank_input<T: Element>(seed: u64, rank: usize, len: usize) -> Vec<T> {
    let mut buf = vec![T::default(); len];
    fill_rank_input(seed, rank, &mut buf);
    buf
}

/// Fill `buf` with the input of `rank` for `(seed, buf.len())`.
pub fn fill_rank_input<T: Element>(seed: u64, rank: usize, buf: &mut [T]) {
    let mut rng = SplitMix64::new(seed, rank as u64);
    for x in buf.iter_mut() {
        *x = T::from_f64(rng.value());
    }
}

/// The input of `rank` for a check within a tolerance ([`count_outside_order_tolerance`]):
/// values of magnitude 1..2, so a missing or extra contribution is far outside rounding.
pub fn narrow_rank_input<T: Element>(seed: u64, rank: usize, len: usize) -> Vec<T> {
    let mut rng = SplitMix64::new(seed, rank as u64);
    (0..len).map(|_| T::from_f64(rng.narrow_value())).collect()
}

/// The exact flat (single-node) result for `ranks` ranks.
pub fn expected_sum<T: Element>(seed: u64, ranks: usize, len: usize) -> Vec<T> {
    let inputs: Vec<Vec<T>> = (0..ranks).map(|r| rank_input(seed, r, len)).collect();
    let views: Vec<&[T]> = inputs.iter().map(|x| &x[..]).collect();
    reference_sum(&views)
}

/// The exact result of the hierarchical plan for ranks placed on nodes by `rank_to_node`.
pub fn expected_hierarchical_sum<T: Element>(seed: u64, rank_to_node: &[usize], len: usize) -> Vec<T> {
    let inputs: Vec<Vec<T>> = (0..rank_to_node.len()).map(|r| rank_input(seed, r, len)).collect();
    let views: Vec<&[T]> = inputs.iter().map(|x| &x[..]).collect();
    crate::hierarchy::hierarchical_reference(&views, rank_to_node)
}

/// Number of elements whose bits differ.
pub fn count_wrong<T: Element>(got: &[T], want: &[T]) -> usize {
    assert_eq!(got.len(), want.len(), "length of result and reference");
    got.iter().zip(want).filter(|(a, b)| !same_bits(**a, **b)).count()
}

/// Elements of `got` farther from the exact sum of the [`narrow_rank_input`] data of
/// `(seed, ranks)` than any order of addition can put them, for algorithms that sum in another
/// order (NCCL), where bits cannot match. Per element, relative to the inputs' magnitudes: each
/// of the at most `ranks - 1` additions and the final rounding errs by at most the dtype's unit
/// roundoff `u` times a partial sum, and every partial sum is at most `sum_r |x_r|`, so
/// `|got - exact| <= ranks * u * sum_r |x_r|`. The exact sum is taken in f64 (exact for these
/// inputs). A NaN or infinity is always outside. With inputs of magnitude 1..2 a contribution
/// (at least 1) exceeds that bound up to 8 ranks in bf16 (`8 * 2^-8 * 16 = 0.5`), so dropping or
/// doubling one rank's input is caught in every element (tested below).
pub fn count_outside_order_tolerance<T: Element>(got: &[T], seed: u64, ranks: usize) -> usize {
    let u = match T::DTYPE {
        crate::DType::F64 => f64::EPSILON / 2.0,
        crate::DType::F32 => f64::from(f32::EPSILON) / 2.0,
        crate::DType::F16 => 2f64.powi(-11),
        crate::DType::BF16 => 2f64.powi(-8),
    };
    let inputs: Vec<Vec<T>> = (0..ranks).map(|r| narrow_rank_input(seed, r, got.len())).collect();
    got.iter()
        .enumerate()
        .filter(|(i, g)| {
            let exact: f64 = inputs.iter().map(|x| x[*i].to_f64()).sum();
            let magnitude: f64 = inputs.iter().map(|x| x[*i].to_f64().abs()).sum();
            let d = (g.to_f64() - exact).abs();
            !d.is_finite() || d > ranks as f64 * u * magnitude
        })
        .count()
}

/// The first `k` elements whose bits differ: `(index, got, want)`, for error messages.
pub fn first_wrong<T: Element>(got: &[T], want: &[T], k: usize) -> Vec<(usize, f64, f64)> {
    got.iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (a, b))| !same_bits(**a, **b))
        .take(k)
        .map(|(i, (a, b))| (i, a.to_f64(), b.to_f64()))
        .collect()
}

/// Bitwise equality (NaN payloads and signed zeros included).
pub fn same_bits<T: Element>(a: T, b: T) -> bool {
    // SAFETY: Element types are plain floats of size_of::<T>() bytes.
    let view = |x: &T| unsafe { std::slice::from_raw_parts(x as *const T as *const u8, size_of::<T>()) };
    view(&a) == view(&b)
}

/// A value no correct allreduce of [`rank_input`] data produces (a NaN), to poison outputs.
pub fn poison<T: Element>() -> T {
    T::from_f64(f64::NAN)
}

#[cfg(test)]
mod order_tolerance_tests {
    use super::*;

    #[test]
    fn another_order_of_addition_passes_and_a_wrong_value_does_not() {
        let (seed, ranks, len) = (3, 8, 4096);
        let inputs: Vec<Vec<half::bf16>> = (0..ranks).map(|r| narrow_rank_input(seed, r, len)).collect();
        let views: Vec<&[half::bf16]> = inputs.iter().map(|x| &x[..]).collect();
        let want = reference_sum(&views);
        // A reduction that drops one whole rank is caught in every element (an absolute bound on
        // wide-magnitude inputs let 75% of such elements through).
        let dropped = reference_sum(&views[..ranks - 1]);
        assert_eq!(count_outside_order_tolerance(&dropped, seed, ranks), len);
        // Sum in reverse rank order, rounding to bf16 after every addition (a ring's order).
        let reversed: Vec<half::bf16> = (0..len)
            .map(|i| {
                let mut acc = inputs[ranks - 1][i];
                for r in (0..ranks - 1).rev() {
                    acc = half::bf16::from_f32(acc.to_f32() + inputs[r][i].to_f32());
                }
                acc
            })
            .collect();
        assert!(count_wrong(&reversed, &want) > 0, "the orders should differ somewhere");
        assert_eq!(count_outside_order_tolerance(&reversed, seed, ranks), 0);
        let mut broken = reversed.clone();
        broken[7] = half::bf16::from_f32(broken[7].to_f32() + 100.0);
        broken[9] = poison();
        assert_eq!(count_outside_order_tolerance(&broken, seed, ranks), 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_reproducible_nonzero_and_differ_by_rank() {
        let a: Vec<f32> = rank_input(7, 0, 1000);
        assert_eq!(a, rank_input::<f32>(7, 0, 1000));
        assert_ne!(a, rank_input::<f32>(7, 1, 1000));
        assert!(a.iter().all(|x| *x != 0.0 && x.is_finite()));
        let mut b = vec![0.0f32; 1000];
        fill_rank_input(7, 0, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn wrong_bits_are_counted() {
        let want: Vec<f32> = expected_sum(3, 3, 100);
        let mut got = want.clone();
        assert_eq!(count_wrong(&got, &want), 0);
        got[5] = poison();
        got[6] = -got[6];
        assert_eq!(count_wrong(&got, &want), 2);
    }
}
