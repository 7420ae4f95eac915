//! Element types tpcomm reduces, and how each one is summed.
//!
//! Every backend sums element `i` over ranks in absolute rank order `0..n-1` in a wider
//! accumulator ([`Element::Acc`]: `f32` for 16- and 32-bit floats, `f64` for `f64`) and rounds
//! once at the end. That fixed order is what makes results bitwise identical on every rank.

use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// The runtime tag of an element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Every dtype, in a fixed order.
    pub const ALL: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name used in benchmark output and on the command line (nccl-tests spelling).
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
        }
    }

    /// A stable small integer, used in call descriptors exchanged between ranks.
    pub(crate) const fn code(self) -> u32 {
        match self {
            DType::F32 => 1,
            DType::F64 => 2,
            DType::F16 => 3,
            DType::BF16 => 4,
        }
    }

    /// The dtype of a [`DType::code`] (a peer's descriptor), for error messages.
    pub(crate) fn from_code(code: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "float" | "f32" | "float32" => Ok(DType::F32),
            "double" | "f64" | "float64" => Ok(DType::F64),
            "half" | "f16" | "float16" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            _ => Err(format!("unknown dtype {s:?}: expected float, double, half or bfloat16")),
        }
    }
}

/// Plain numbers without padding, whose bytes may be sent as they are.
pub(crate) trait Pod: Copy {}
impl Pod for u64 {}
impl<T: Element> Pod for T {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point accumulator (`f32` or `f64`).
pub trait Accumulator:
    Copy + Default + std::ops::Add<Output = Self> + std::ops::AddAssign + PartialEq + fmt::Debug + 'static
{
}
impl Accumulator for f32 {}
impl Accumulator for f64 {}

/// An element type tpcomm can reduce. Sealed: implemented for `f32`, `f64`, [`half::f16`] and
/// [`half::bf16`]. It implies what cudarc needs of device memory (`DeviceRepr`,
/// `ValidAsZeroBits`), so generic device code needs this one bound.
pub trait Element:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + Default
    + PartialEq
    + fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    /// The runtime tag.
    const DTYPE: DType;
    /// The accumulator summed in.
    type Acc: Accumulator;
    /// Widen to the accumulator (exact).
    fn to_acc(self) -> Self::Acc;
    /// Round the accumulator to the element type (round to nearest even).
    fn from_acc(acc: Self::Acc) -> Self;
    /// Widen to f64 (exact), for references and printing.
    fn to_f64(self) -> f64;
    /// An f64 to this type (used to make test inputs). Not correctly rounded for bf16
    /// (`half` 2.x rounds values just above a tie down); exact references round from the
    /// accumulator with [`Element::from_acc`].
    fn from_f64(x: f64) -> Self;
    /// `dst[i] = src[i].to_acc()` for a block (vectorised where the type has a fast path).
    #[inline]
    fn widen(src: &[Self], dst: &mut [Self::Acc]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }
    /// `dst[i] = Self::from_acc(src[i])` for a block, same rounding as [`Element::from_acc`].
    #[inline]
    fn narrow(src: &[Self::Acc], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(*s);
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    type Acc = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(acc: f32) -> Self {
        acc
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    type Acc = f64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(acc: f64) -> Self {
        acc
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// The 16-bit floats: summed in f32; block conversions through `half`'s slice functions, which
/// use F16C (x86) or NEON where the CPU has them, checked once per block rather than per element.
macro_rules! half_element {
    ($t:ident, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            type Acc = f32;
            #[inline(always)]
            fn to_acc(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_acc(acc: f32) -> Self {
                $t::from_f32(acc)
            }
            fn to_f64(self) -> f64 {
                self.to_f64()
            }
            fn from_f64(x: f64) -> Self {
                $t::from_f64(x)
            }
            #[inline]
            fn widen(src: &[Self], dst: &mut [f32]) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
            }
            #[inline]
            fn narrow(src: &[f32], dst: &mut [Self]) {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
            }
        }
    };
}

half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);

/// The exact reference every backend must match bit for bit: `sum(inputs[r][i] for r in 0..n)`
/// in rank order in the accumulator, rounded once.
pub fn reference_sum<T: Element>(inputs: &[&[T]]) -> Vec<T> {
    let len = inputs.first().map_or(0, |x| x.len());
    (0..len)
        .map(|i| {
            let mut acc = T::Acc::default();
            for (r, x) in inputs.iter().enumerate() {
                if r == 0 {
                    acc = x[i].to_acc();
                } else {
                    acc += x[i].to_acc();
                }
            }
            T::from_acc(acc)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_conversions_round_like_single_ones() {
        // Every f16 and bf16 bit pattern widens identically, and a spread of f32 values
        // (including ties, subnormals, infinities and NaN) narrows identically.
        let all16: Vec<u16> = (0..=u16::MAX).collect();
        let h: Vec<f16> = all16.iter().map(|&b| f16::from_bits(b)).collect();
        let mut wide = vec![0.0f32; h.len()];
        f16::widen(&h, &mut wide);
        assert!(h.iter().zip(&wide).all(|(x, w)| x.to_f32().to_bits() == w.to_bits() || w.is_nan()));
        let b: Vec<bf16> = all16.iter().map(|&x| bf16::from_bits(x)).collect();
        bf16::widen(&b, &mut wide);
        assert!(b.iter().zip(&wide).all(|(x, w)| x.to_f32().to_bits() == w.to_bits() || w.is_nan()));
        let mut rng = crate::verify::SplitMix64::new(1, 2);
        let mut xs: Vec<f32> = (0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32)).collect();
        xs.extend([1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 65520.0, 1e-8, f32::INFINITY, -0.0]);
        let mut hs = vec![f16::ZERO; xs.len()];
        f16::narrow(&xs, &mut hs);
        for (x, got) in xs.iter().zip(&hs) {
            let want = f16::from_f32(*x);
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{x:e}");
        }
        let mut bs = vec![bf16::ZERO; xs.len()];
        bf16::narrow(&xs, &mut bs);
        for (x, got) in xs.iter().zip(&bs) {
            let want = bf16::from_f32(*x);
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{x:e}");
        }
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.as_str().parse::<DType>().unwrap(), d);
        }
        assert!("int8".parse::<DType>().is_err());
    }

    #[test]
    fn reference_sums_in_rank_order_with_one_rounding() {
        // 1 + 2^-24 + 2^-24 in f32: rank order gives 1.0 (each add rounds back), a
        // different association would give 1 + 2^-23.
        let a = [1.0f32];
        let b = [2f32.powi(-24)];
        let r = reference_sum(&[&a[..], &b[..], &b[..]]);
        assert_eq!(r[0].to_bits(), 1.0f32.to_bits());
        // bf16 inputs are summed in f32 and rounded once: 1 + 3 * 2^-9 is not representable
        // in bf16 (8 bits of mantissa), the f32 sum is exact and rounds to 1 + 2^-7.
        let one = [bf16::from_f32(1.0)];
        let small = [bf16::from_f32(2f32.powi(-9))];
        let r = reference_sum(&[&one[..], &small[..], &small[..], &small[..]]);
        assert_eq!(r[0], bf16::from_f32(1.0 + 3.0 * 2f32.powi(-9)));
        assert_eq!(r[0].to_f32(), 1.0 + 2f32.powi(-7));
    }
}
