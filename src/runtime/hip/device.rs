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
//!
//! The free functions below are the facade's device queries, the HIP counterparts of
//! `runtime/cuda/device.rs`: [`open`] (the GPU of an ordinal, or `local_rank % visible GPUs`),
//! and what the topology asks (names, PCI bus ids, UUIDs, peer access, native atomics).

use super::stream::HipStream;
use super::{check, rocm_device_count, ARCHS};
use crate::error::{Error, Result};
use hip_runtime_sys::{
    hipDeviceCanAccessPeer, hipDeviceGetByPCIBusId, hipDeviceGetName, hipDeviceGetP2PAttribute, hipDeviceGetPCIBusId,
    hipDeviceGetUuid, hipDeviceP2PAttr, hipDeviceProp_t, hipDeviceSynchronize, hipError_t, hipGetDeviceProperties,
    hipSetDevice, hipUUID,
};
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
    /// an architecture tpcomm has no code objects for (`select_arch`);
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

    /// A new stream on this device ([`HipStream::new`]), shared: what cudarc's
    /// `CudaContext::new_stream` is on CUDA.
    ///
    /// # Errors
    /// As [`HipStream::new`].
    pub fn new_stream(self: &Arc<Self>) -> Result<Arc<HipStream>> {
        HipStream::new(self).map(Arc::new)
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

/// The GPU `ordinal`, or `local_rank % visible GPUs` when `ordinal` is `None`, opened and made
/// current on this thread ([`HipDevice::open`]).
///
/// # Errors
/// As [`HipDevice::open`]: [`Error::Unsupported`] with the probe's answer where no AMD GPU is
/// usable.
pub(crate) fn open(ordinal: Option<usize>, local_rank: usize) -> Result<Arc<HipDevice>> {
    let count = rocm_device_count()?;
    HipDevice::open(ordinal.unwrap_or(local_rank % count.max(1)))
}

/// Make `device` current on the calling thread.
///
/// # Errors
/// As [`HipDevice::bind`].
pub(crate) fn bind(device: &HipDevice) -> Result<()> {
    device.bind()
}

/// AMD GPUs HIP sees in this process; 0 where it sees none or cannot start.
pub(crate) fn device_count() -> usize {
    rocm_device_count().unwrap_or(0)
}

/// A device's ordinal as HIP takes it, if HIP sees such a device.
fn visible(ordinal: usize) -> Option<i32> {
    check_ordinal(ordinal, device_count()).ok()
}

/// The marketing name of GPU `ordinal` (`hipDeviceGetName`), if HIP sees it.
pub(crate) fn device_name(ordinal: usize) -> Option<String> {
    let id = visible(ordinal)?;
    let mut buf = [0 as c_char; 256];
    // SAFETY: the buffer is writable for its whole length; HIP NUL-terminates within it.
    check("hipDeviceGetName", unsafe { hipDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, id) }).ok()?;
    Some(c_field(&buf))
}

/// The PCI bus id of GPU `ordinal` (`0000:c1:00.0`), lower case (`hipDeviceGetPCIBusId`), if HIP
/// sees it.
pub(crate) fn pci_bus_id(ordinal: usize) -> Option<String> {
    let id = visible(ordinal)?;
    let mut buf = [0 as c_char; 32];
    // SAFETY: as in `device_name`.
    check("hipDeviceGetPCIBusId", unsafe { hipDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, id) }).ok()?;
    Some(c_field(&buf).to_lowercase())
}

/// The ordinal of `device`.
pub(crate) fn ordinal(device: &HipDevice) -> usize {
    device.ordinal()
}

/// The UUID of `device` (`hipDeviceGetUuid`; zeros where HIP reports none) and its PCI bus id
/// (empty where unknown): what tells ranks sharing a GPU apart.
pub(crate) fn identity(device: &HipDevice) -> ([u8; 16], String) {
    let mut uuid = hipUUID { bytes: [0; 16] };
    // SAFETY: a valid out pointer; HIP checks the device id.
    let uuid = match check("hipDeviceGetUuid", unsafe { hipDeviceGetUuid(&mut uuid, device.ordinal) }) {
        Ok(()) => uuid.bytes.map(|b| b as u8),
        Err(_) => [0; 16],
    };
    (uuid, pci_bus_id(device.ordinal()).unwrap_or_default())
}

/// The HIP device id of the GPU with PCI bus id `bus`.
///
/// # Errors
/// Why it cannot be found (not visible in this process, or a malformed id).
fn by_bus_id(bus: &str) -> std::result::Result<i32, String> {
    let c = std::ffi::CString::new(bus).map_err(|e| e.to_string())?;
    let mut peer: i32 = 0;
    // SAFETY: a valid out pointer and a NUL-terminated id.
    check("hipDeviceGetByPCIBusId", unsafe { hipDeviceGetByPCIBusId(&mut peer, c.as_ptr()) }).map_err(|e| {
        format!(
            "GPU {bus}, used by another rank, is not visible to this process ({e}); when HIP_VISIBLE_DEVICES gives \
             each rank only its own GPU, tpcomm cannot check peer access between GPUs, so the IPC kernels stay off \
             and RCCL serves the calls: make every GPU of the node visible to every rank and pick each rank's GPU \
             with Communicator::builder(..).device(ordinal)"
        )
    })?;
    Ok(peer)
}

/// Whether `device` can access the GPU with PCI bus id `peer_bus` directly
/// (`hipDeviceCanAccessPeer`).
///
/// # Errors
/// Why it cannot be told.
pub(crate) fn p2p_access(device: &HipDevice, peer_bus: &str) -> std::result::Result<bool, String> {
    let peer = by_bus_id(peer_bus)?;
    let mut can = 0;
    // SAFETY: a valid out pointer; HIP checks both ids.
    check("hipDeviceCanAccessPeer", unsafe { hipDeviceCanAccessPeer(&mut can, device.ordinal, peer) })
        .map_err(|e| e.to_string())?;
    Ok(can != 0)
}

/// Whether the link from `device` to the GPU `peer_bus` supports native atomics, as HIP reports
/// it (`hipDevP2PAttrNativeAtomicSupported`; what it says for xGMI and PCIe links is not
/// checked on AMD hardware); false when HIP cannot tell.
pub(crate) fn native_atomics(device: &HipDevice, peer_bus: &str) -> bool {
    let Ok(peer) = by_bus_id(peer_bus) else { return false };
    let mut value = 0;
    // SAFETY: a valid out pointer; HIP checks both ids.
    let r = unsafe {
        hipDeviceGetP2PAttribute(&mut value, hipDeviceP2PAttr::hipDevP2PAttrNativeAtomicSupported, device.ordinal, peer)
    };
    check("hipDeviceGetP2PAttribute", r).is_ok() && value != 0
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

    /// Without an AMD GPU the facade's open is Unsupported naming what is missing, and the
    /// device queries answer "nothing" instead of failing.
    #[test]
    fn the_facade_without_an_amd_gpu_opens_nothing_and_finds_nothing() {
        if rocm_device_count().is_ok() {
            return; // a machine with an AMD GPU: the answers below are for machines without one
        }
        for (ordinal, local_rank) in [(None, 0), (None, 3), (Some(0), 0), (Some(2), 1)] {
            match open(ordinal, local_rank) {
                Err(Error::Unsupported { what, reason }) => {
                    assert!(what.contains("ROCm"), "{what}");
                    assert!(reason.contains("AMD GPU") || reason.contains("HIP runtime"), "{reason}");
                }
                Err(e) => panic!("{ordinal:?}: {e}"),
                Ok(_) => panic!("{ordinal:?}: a device without an AMD GPU"),
            }
        }
        assert_eq!(device_count(), 0);
        assert_eq!((device_name(0), pci_bus_id(0)), (None, None));
        let dev = HipDevice::assumed(0, select_arch("gfx942").unwrap());
        assert_eq!(identity(&dev), ([0; 16], String::new()));
        assert!(!native_atomics(&dev, "0000:c1:00.0"));
        assert!(p2p_access(&dev, "0000:c1:00.0").unwrap_err().contains("not visible"));
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
