//! The test harness of gpu_check: the tally (passed, failed, skipped: a check that did not run is
//! never a pass), exact references from periodic inputs, and buffer helpers.

use anyhow::{anyhow, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use std::ops::Range;
use std::sync::Arc;
use tpcomm::verify::reference_sum;
use tpcomm::{Communicator, DeviceBuffer, Element, Error};

pub const MIB: usize = 1 << 20;

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rank `r`'s element `i` for `seed`: a non-zero value of either sign between 2^-4 and 2^4.
pub fn value<T: Element>(seed: u64, r: usize, i: usize) -> T {
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
pub struct Inputs<T> {
    tables: Vec<Vec<T>>,
    shift: usize,
    /// `reference_sum` over the ranks' tables: the expected result at `(i + shift) % p`.
    reference: Vec<T>,
}

impl<T: Element> Inputs<T> {
    pub fn new(seed: u64, n: usize, len: usize) -> Self {
        let p = len.clamp(1, PERIOD);
        let tables: Vec<Vec<T>> = (0..n).map(|r| (0..p).map(|k| value(seed, r, k)).collect()).collect();
        let refs: Vec<&[T]> = tables.iter().map(|t| &t[..]).collect();
        let reference = reference_sum(&refs);
        Inputs { tables, shift: (splitmix(seed) % p as u64) as usize, reference }
    }

    pub fn rank_input(&self, r: usize, len: usize) -> Vec<T> {
        let t = &self.tables[r];
        (0..len).map(|i| t[(i + self.shift) % t.len()]).collect()
    }

    /// Elements of `out` whose bits differ from the reference, and the first of them.
    pub fn verify(&self, out: &[T]) -> (usize, String) {
        let p = self.reference.len();
        let mut wrong = 0;
        let mut first = String::new();
        for (i, o) in out.iter().enumerate() {
            let e = self.reference[(i + self.shift) % p];
            if !tpcomm::verify::same_bits(*o, e) {
                if wrong == 0 {
                    first = format!("element {i}: got {o:?} expected {e:?}");
                }
                wrong += 1;
            }
        }
        (wrong, first)
    }
}

/// Passed, failed and skipped checks of this rank.
pub struct Tally {
    pub rank: usize,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    pub fn record(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                self.failed += 1;
                eprintln!("FAIL rank {}: {name}: {e:#}", self.rank);
            }
        }
    }

    /// A check that could not run here: reported, never counted as passed.
    pub fn skip(&mut self, name: &str, why: &str) {
        self.skipped += 1;
        if self.rank == 0 {
            println!("SKIPPED {name}: {why}");
        }
    }

    /// A step that could not even set itself up: one failure.
    pub fn step(&mut self, name: &str, result: Result<()>) {
        if let Err(e) = result {
            self.failed += 1;
            eprintln!("FAIL rank {}: step {name} stopped: {e:#}", self.rank);
        }
    }
}

/// One test program's context.
pub struct Ctx<'a> {
    pub comm: &'a Communicator,
    pub stream: Arc<CudaStream>,
    pub n: usize,
    pub rank: usize,
    pub seed: u64,
    pub sabotage: bool,
}

impl Ctx<'_> {
    pub fn next_seed(&mut self) -> u64 {
        self.seed += 1;
        splitmix(self.seed)
    }
}

/// Device memory of either kind (cudarc's, or tpcomm's), seen through views.
pub trait Buf<T> {
    fn view(&self, r: Range<usize>) -> CudaView<'_, T>;
    fn view_mut(&mut self, r: Range<usize>) -> CudaViewMut<'_, T>;
    fn count(&self) -> usize;
}

impl<T> Buf<T> for CudaSlice<T> {
    fn view(&self, r: Range<usize>) -> CudaView<'_, T> {
        self.slice(r)
    }
    fn view_mut(&mut self, r: Range<usize>) -> CudaViewMut<'_, T> {
        self.slice_mut(r)
    }
    fn count(&self) -> usize {
        self.len()
    }
}

impl<T> Buf<T> for DeviceBuffer<T> {
    fn view(&self, r: Range<usize>) -> CudaView<'_, T> {
        self.slice(r)
    }
    fn view_mut(&mut self, r: Range<usize>) -> CudaViewMut<'_, T> {
        self.slice_mut(r)
    }
    fn count(&self) -> usize {
        self.len()
    }
}

pub fn poison<T: Element>(stream: &Arc<CudaStream>, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
    let nan = vec![T::from_f64(f64::NAN); dst.len()];
    stream.memcpy_htod(&nan, dst)?;
    Ok(())
}

pub fn read<T: Element>(stream: &Arc<CudaStream>, src: &CudaView<'_, T>) -> Result<Vec<T>> {
    let mut host = vec![T::default(); src.len()];
    stream.memcpy_dtoh(src, &mut host)?;
    stream.synchronize()?;
    Ok(host)
}

/// Elements after the message that are poisoned too and must stay untouched.
pub const GUARD: usize = 64;

/// Poison up to [`GUARD`] elements of `buf` after the first `len`; returns how many.
pub fn guard_poison<T: Element>(s: &Arc<CudaStream>, buf: &mut dyn Buf<T>, len: usize) -> Result<usize> {
    let g = GUARD.min(buf.count() - len);
    if g > 0 {
        poison(s, &mut buf.view_mut(len..len + g))?;
    }
    Ok(g)
}

/// Check that the `g` guard elements after `len` still hold the poison.
pub fn guard_check<T: Element>(s: &Arc<CudaStream>, buf: &dyn Buf<T>, len: usize, g: usize) -> Result<()> {
    if g == 0 {
        return Ok(());
    }
    let after = read(s, &buf.view(len..len + g))?;
    match after.iter().position(|x| !x.to_f64().is_nan()) {
        None => Ok(()),
        Some(i) => Err(anyhow!("element {} past the end of the message was written ({:?})", len + i, after[i])),
    }
}

/// The result against the reference; with `--sabotage` one element is corrupted first, so this
/// check must fail (the run proves it can).
pub fn check_out<T: Element>(c: &Ctx, inputs: &Inputs<T>, got: &[T]) -> Result<()> {
    let mut got = got.to_vec();
    if c.sabotage && !got.is_empty() {
        let k = got.len() / 2;
        got[k] = T::from_f64(got[k].to_f64() * 2.0 + 1.0);
    }
    let (wrong, first) = inputs.verify(&got);
    if wrong > 0 {
        return Err(anyhow!("{wrong} of {} elements differ from reference_sum; first: {first}", got.len()));
    }
    Ok(())
}

pub fn expect_err(r: tpcomm::Result<()>, want: fn(&Error) -> bool, what: &str) -> Result<()> {
    match r {
        Ok(()) => Err(anyhow!("{what}: succeeded, an error was expected")),
        Err(e) if want(&e) => Ok(()),
        Err(e) => Err(anyhow!("{what}: wrong error: {e}")),
    }
}
