//! What the machine looks like: GPUs and network devices near them.

use std::path::{Path, PathBuf};

/// Number of CUDA devices visible to this process, or 0 where no CUDA driver can be loaded.
pub fn cuda_device_count() -> usize {
    // SAFETY: only probes whether the driver library loads; no driver call is made if not.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// The GPU a rank with this local index uses: `local_rank % devices` (ranks share GPUs when
/// there are more ranks than GPUs), or `local_rank` itself where no GPU is visible.
pub fn local_gpu_index(local_rank: usize) -> usize {
    match cuda_device_count() {
        0 => local_rank,
        n => local_rank % n,
    }
}

/// PCI bus id of a CUDA device (`0000:3b:00.0`), lower case, if the driver reports one.
fn gpu_pci_bus_id(ordinal: usize) -> Option<String> {
    use cudarc::driver::{result, sys};
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: the buffer is writable for its whole length and the driver NUL-terminates.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev) }.result().ok()?;
    // SAFETY: NUL-terminated by the driver on success.
    let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(id.to_string_lossy().to_lowercase())
}

/// Sorted network devices under `root` (normally `/sys/class/infiniband`), each with the
/// resolved sysfs path of its PCI function.
fn network_devices(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(dir) = std::fs::read_dir(root) else { return Vec::new() };
    let mut devs: Vec<(String, PathBuf)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = std::fs::canonicalize(e.path().join("device")).ok()?;
            Some((name, path))
        })
        .collect();
    devs.sort();
    devs
}

/// Index of the device in `devs` whose sysfs path shares the longest prefix with `gpu`
/// (the same PCIe switch wins over the same root complex); ties go to the lowest index.
fn nearest(devs: &[(String, PathBuf)], gpu: &Path) -> Option<usize> {
    let common = |p: &Path| p.components().zip(gpu.components()).take_while(|(a, b)| a == b).count();
    let mut best: Option<(usize, usize)> = None;
    for (i, (_, path)) in devs.iter().enumerate() {
        let c = common(path);
        if best.map_or(true, |(_, bc)| c > bc) {
            best = Some((i, c));
        }
    }
    best.map(|(i, _)| i)
}

/// The network device (index into the sorted `/sys/class/infiniband` entries) nearest the GPU
/// of the rank with this local index; its local GPU index where there is no network device or
/// the GPU's place on the PCI bus is unknown.
pub fn nearest_network_device(local_rank: usize) -> usize {
    let gpu = local_gpu_index(local_rank);
    let devs = network_devices(Path::new("/sys/class/infiniband"));
    if devs.is_empty() {
        return gpu;
    }
    let gpu_path =
        gpu_pci_bus_id(gpu).and_then(|id| std::fs::canonicalize(Path::new("/sys/bus/pci/devices").join(id)).ok());
    match gpu_path {
        Some(p) => nearest(&devs, &p).unwrap_or(gpu),
        None => gpu % devs.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_prefers_the_same_switch() {
        let devs = vec![
            ("mlx5_0".to_string(), PathBuf::from("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0")),
            ("mlx5_1".to_string(), PathBuf::from("/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0")),
        ];
        let gpu = Path::new("/sys/devices/pci0000:80/0000:80:01.0/0000:82:00.0");
        assert_eq!(nearest(&devs, gpu), Some(1));
        assert_eq!(nearest(&[], gpu), None);
    }

    #[test]
    fn no_network_devices_means_gpu_index() {
        let tmp = std::env::temp_dir().join(format!("tpcomm-no-ib-{}", std::process::id()));
        assert!(network_devices(&tmp).is_empty());
    }
}
