//! An opened AMD GPU: what cudarc's `CudaContext` is to the CUDA side of tpcomm.
//!
//! HIP has no context to hand around: each host thread has a current device (`hipSetDevice`).
//! A [`HipDevice`] keeps the ordinal and binds it ([`HipDevice::bind`]) before each call the
//! owning types of this module make, and it keeps the first error a `Drop` met
//! ([`HipDevice::record_err`], returned later by [`HipDevice::check_err`]), as cudarc's context
//! does, so that no `Drop` panics.
//!
//! Opening a device also reads the properties that decide which embedded code objects it loads:
//! HIP names the architecture with its target features, as in `gfx942:sramecc+:xnack-`, and
//! [`select_arch`] keeps the part before the first `:`. The code objects are built for "xnack
//! any" and "sramecc any", so either setting of those features loads them.

use super::{check, rocm_device_count, ARCHS};
use crate::error::{Error, Result};
use hip_runtime_sys::{hipDeviceProp_t, hipDeviceSynchronize, hipError_t, hipGetDeviceProperties, hipSetDevice};
use std::ffi::c_char;
use std::sync::{Arc, Mutex};

/// An AMD architecture tpcomm embeds code objects for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// The name clang and HIP use, e.g. `gfx942`.
    pub name: &'static str,
    /// The `EF_AMDGPU_MACH_*` number the code objects' ELF `e_flags` carry (low byte).
    pub mach: u32,
}

/// The architecture whose code objects run on a GPU HIP names `gcn_arch_name`: the part before
/// the first `:` (target features such as `sramecc+` or `xnack-` follow it) must be one of the
/// embedded architectures exactly.
///
/// # Errors
/// [`Error::Unsupported`] naming `gcn_arch_name` for any other architecture, an empty name
/// included: no code object of tpcomm runs there.
pub fn select_arch(gcn_arch_name: &str) -> Result<Arch> {
    let base = gcn_arch_name.split(':').next().unwrap_or_default().trim();
    ARCHS.iter().find(|(name, _)| *name == base).map(|&(name, mach)| Arch { name, mach }).ok_or_else(|| {
        let known: Vec<&str> = ARCHS.iter().map(|(name, _)| *name).collect();
        Error::Unsupported {
            what: format!("the AMD GPU architecture {gcn_arch_name:?}"),
            reason: format!(
                "tpcomm embeds code objects for {} only (MI200, MI300); other AMD GPUs need a build for their \
                 architecture",
                known.join(" and ")
            ),
        }
    })
}

/// The text of a fixed-size C string field (up to its first NUL, or the whole field).
fn c_field(field: &[c_char]) -> String {
    let bytes: Vec<u8> = field.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ordinal` as HIP takes it, where `count` GPUs are visible.
///
/// # Errors
/// [`Error::InvalidArgument`] when `ordinal` is not below `count`.
fn check_ordinal(ordinal: usize, count: usize) -> Result<i32> {
    match i32::try_from(ordinal) {
        Ok(id) if ordinal < count => Ok(id),
        _ => Err(Error::invalid(
            "HipDevice::open",
            format!("device ordinal {ordinal}, but HIP sees {count} AMD GPU(s) in this process"),
        )),
    }
}

/// `hipDeviceProp_t` with room behind it: the bindings are HIP 5.4's, the runtime may be
/// another 5.x whose struct is longer, and HIP writes its own size.
#[repr(C)]
struct Props {
    prop: hipDeviceProp_t,
    slack: [u8; 4096],
}

/// One AMD GPU, opened: its ordinal, name, architecture and the first error met in a `Drop`.
#[derive(Debug)]
pub struct HipDevice {
    ordinal: i32,
    name: String,
    arch_name: String,
    arch: Arch,
    multiprocessors: usize,
    first_err: Mutex<Option<Error>>,
}

impl HipDevice {
    /// Open GPU `ordinal` of this process (`hipSetDevice`, `hipGetDeviceProperties`) and pick
    /// the architecture of its code objects.
    ///
    /// # Errors
    /// [`Error::Unsupported`] without an AMD GPU (the answer of [`rocm_device_count`]) or for
    /// an architecture tpcomm has no code objects for ([`select_arch`]);
    /// [`Error::InvalidArgument`] when `ordinal` is not a visible GPU; [`Error::Hip`] naming
    /// the call that failed.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let id = check_ordinal(ordinal, rocm_device_count()?)?;
        // SAFETY: plain call with a device id HIP reported as present.
        check("hipSetDevice", unsafe { hipSetDevice(id) })?;
        // SAFETY: all zeros is a valid value of this C struct of integers, arrays and raw
        // pointers; the slack is plain bytes.
        let mut props: Box<Props> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: a valid out pointer to a struct at least as large as the bindings' one.
        check("hipGetDeviceProperties", unsafe { hipGetDeviceProperties(&mut props.prop, id) })?;
        let arch_name = c_field(&props.prop.gcnArchName);
        let arch = select_arch(&arch_name)?;
        Ok(Arc::new(HipDevice {
            ordinal: id,
            name: c_field(&props.prop.name),
            arch_name,
            arch,
            multiprocessors: usize::try_from(props.prop.multiProcessorCount).unwrap_or(0),
            first_err: Mutex::new(None),
        }))
    }

    /// A device with the given ordinal and architecture, without asking HIP whether it exists:
    /// lets the tests reach the constructors that need a device and see the runtime's answer on
    /// a machine without one.
    #[cfg(test)]
    pub(crate) fn assumed(ordinal: i32, arch: Arch) -> Arc<Self> {
        Arc::new(HipDevice {
            ordinal,
            name: "assumed".into(),
            arch_name: arch.name.into(),
            arch,
            multiprocessors: 0,
            first_err: Mutex::new(None),
        })
    }

    /// Make this the calling thread's current device (`hipSetDevice`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] where HIP can use no AMD GPU; [`Error::Hip`].
    pub fn bind(&self) -> Result<()> {
        // SAFETY: plain call; HIP checks the id.
        check("hipSetDevice", unsafe { hipSetDevice(self.ordinal) })
    }

    /// Wait for all work on the device (`hipDeviceSynchronize`).
    ///
    /// # Errors
    /// [`Error::Hip`] when work on the device failed.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: plain call on the bound device.
        check("hipDeviceSynchronize", unsafe { hipDeviceSynchronize() })
    }

    /// The HIP device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal as usize
    }

    /// The marketing name HIP reports (e.g. `AMD Instinct MI300X`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture with its target features, as HIP reports it (`gcnArchName`).
    pub fn arch_name(&self) -> &str {
        &self.arch_name
    }

    /// The architecture whose code objects this device loads.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Compute units (HIP's `multiProcessorCount`).
    pub fn multiprocessor_count(&self) -> usize {
        self.multiprocessors
    }

    /// Keep the first error of `result` (a `Drop` cannot return it).
    pub(crate) fn record_err(&self, result: Result<()>) {
        if let Err(e) = result {
            let mut first = self.first_err.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            first.get_or_insert(e);
        }
    }

    /// For `Drop`s: bind the device, run `release` (the raw call that frees something of it)
    /// and keep the first failure of either.
    pub(crate) fn release(&self, op: &'static str, release: impl FnOnce() -> hipError_t) {
        self.record_err(self.bind());
        self.record_err(check(op, release()));
    }

    /// The first error a `Drop` recorded since the last call, if any (then forgotten).
    ///
    /// # Errors
    /// That error.
    pub fn check_err(&self) -> Result<()> {
        let mut first = self.first_err.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        first.take().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_with_target_features_pick_the_embedded_architecture() {
        for (reported, name, mach) in [
            ("gfx942", "gfx942", 0x4c),
            ("gfx942:sramecc+:xnack-", "gfx942", 0x4c),
            ("gfx942:xnack+", "gfx942", 0x4c),
            ("gfx90a:sramecc+:xnack-", "gfx90a", 0x3f),
            ("gfx90a", "gfx90a", 0x3f),
        ] {
            assert_eq!(select_arch(reported).unwrap(), Arch { name, mach }, "{reported}");
        }
    }

    #[test]
    fn other_architectures_are_unsupported_by_name() {
        // gfx940/gfx941 are early MI300 parts: a gfx942 code object does not load there.
        for reported in ["gfx1100", "gfx908:sramecc-", "gfx940:sramecc+:xnack-", "gfx9420", "", ":gfx942", "sm_90"] {
            match select_arch(reported) {
                Err(Error::Unsupported { what, reason }) => {
                    assert!(what.contains(&format!("{reported:?}")), "{what}");
                    assert!(reason.contains("gfx90a and gfx942"), "{reason}");
                }
                other => panic!("{reported:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn c_fields_end_at_the_first_nul_or_the_field() {
        let mut field = [0 as c_char; 16];
        for (f, b) in field.iter_mut().zip(b"gfx942:xnack-") {
            *f = *b as c_char;
        }
        assert_eq!(c_field(&field), "gfx942:xnack-");
        assert_eq!(c_field(&[b'a' as c_char, b'b' as c_char]), "ab");
        assert_eq!(c_field(&[0; 4]), "");
    }

    #[test]
    fn ordinals_must_name_a_visible_gpu() {
        assert_eq!(check_ordinal(0, 1).unwrap(), 0);
        assert_eq!(check_ordinal(7, 8).unwrap(), 7);
        for (ordinal, count) in [(1, 1), (0, 0), (usize::MAX, usize::MAX)] {
            assert!(
                matches!(check_ordinal(ordinal, count), Err(Error::InvalidArgument { op: "HipDevice::open", .. })),
                "{ordinal} of {count}"
            );
        }
    }

    /// Without an AMD GPU (every CI machine) opening one is Unsupported; with one, it opens a
    /// device of an embedded architecture.
    #[test]
    fn opening_a_device_without_an_amd_gpu_is_unsupported() {
        match (rocm_device_count(), HipDevice::open(0)) {
            (Err(_), Err(Error::Unsupported { what, .. })) => assert!(what.contains("ROCm"), "{what}"),
            (Ok(_), Ok(dev)) => assert!(ARCHS.iter().any(|(n, _)| *n == dev.arch().name)),
            (Ok(_), Err(e @ Error::Unsupported { .. })) => assert!(e.to_string().contains("architecture"), "{e}"),
            (probe, open) => panic!("probe {probe:?}, open {open:?}"),
        }
    }

    #[test]
    fn the_first_recorded_error_is_kept_and_then_forgotten() {
        let dev = HipDevice::assumed(0, select_arch("gfx942").unwrap());
        assert!(dev.check_err().is_ok());
        dev.record_err(Ok(()));
        dev.record_err(Err(Error::Internal("first".into())));
        dev.record_err(Err(Error::Internal("second".into())));
        assert!(matches!(dev.check_err(), Err(Error::Internal(m)) if m == "first"));
        assert!(dev.check_err().is_ok());
    }
}
