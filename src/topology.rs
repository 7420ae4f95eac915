//! What the machine looks like: GPUs, the links between them, and network devices near them.
//!
//! Every verdict about a node's GPUs ([`gpu_layout`]) is made from data gathered from every rank
//! of the node, so it is the same on every rank.

use crate::error::Result;
use crate::runtime::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Number of CUDA devices visible to this process, or 0 where no CUDA driver can be loaded.
pub fn cuda_device_count() -> usize {
    // SAFETY: only probes whether the driver library loads; no driver call is made if not.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// The GPU a rank with this local index uses: `local_rank % devices` (ranks share GPUs when
/// there are more ranks than GPUs), or `local_rank` itself where no GPU is visible. GPUs are
/// this build's vendor's (CUDA, or HIP in a ROCm build).
pub fn local_gpu_index(local_rank: usize) -> usize {
    match crate::runtime::device_count() {
        0 => local_rank,
        n => local_rank % n,
    }
}

/// Name of a GPU of this build's vendor (`NVIDIA H100 80GB HBM3`), if the driver and the device
/// are there.
pub fn gpu_name(ordinal: usize) -> Option<String> {
    crate::runtime::device_name(ordinal)
}

/// PCI bus id of a GPU (`0000:3b:00.0`), lower case, if the driver reports one.
fn gpu_pci_bus_id(ordinal: usize) -> Option<String> {
    crate::runtime::pci_bus_id(ordinal)
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
        if best.is_none_or(|(_, bc)| c > bc) {
            best = Some((i, c));
        }
    }
    best.map(|(i, _)| i)
}

/// The network device (index into the sorted `/sys/class/infiniband` entries) nearest the GPU
/// of the rank with this local index; its local GPU index where there is no network device or
/// the GPU's place on the PCI bus is unknown.
pub(crate) fn nearest_network_device(local_rank: usize) -> usize {
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

/// How the ranks of one node map onto GPUs, as the custom IPC allreduce needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GpuLayout {
    /// Per rank of the node communicator: index of its GPU among the node's distinct GPUs
    /// (numbered by first appearance in rank order).
    pub device_of_rank: Vec<usize>,
    /// Ranks on the GPU with the most ranks (1 = every rank has its own GPU). Ranks sharing a
    /// GPU must cap their grids so all their blocks fit at once.
    pub max_ranks_per_device: usize,
    /// Why the custom allreduce cannot run on this layout (the same verdict on every rank), or
    /// `None` when every pair of GPUs used can access each other's memory.
    pub unsupported: Option<String>,
    /// Every pair of distinct GPUs in use is linked by NVLink, as the driver tells it: native
    /// atomics between peers, which PCIe peer access lacks (the seed's `full_nvlink`). True when
    /// all ranks share one GPU. The same verdict on every rank.
    pub full_nvlink: bool,
}

impl GpuLayout {
    /// Distinct GPUs the node's ranks use.
    pub fn devices(&self) -> usize {
        self.device_of_rank.iter().max().map_or(0, |m| m + 1)
    }
}

/// Identity of a device: its UUID and its PCI bus id.
fn device_identity(ctx: &Context) -> ([u8; 16], String) {
    crate::runtime::identity(ctx)
}

/// Ranks of `comm` that share a GPU: one entry per GPU used by more than one rank, holding the
/// GPU's UUID (as `GPU-xxxxxxxx-...`) and the ranks (in `comm`) that use it, in rank order.
/// Ranks whose driver reports no UUID are never counted as sharing.
///
/// # Collective
/// Every rank of `comm` (any number of nodes).
///
/// # Errors
/// [`crate::Error::PeerTimeout`] when a rank does not arrive within `timeout`.
pub(crate) fn shared_gpus<C: mpi::traits::Communicator>(
    comm: &C,
    ctx: &Context,
    timeout: Duration,
) -> Result<Vec<(String, Vec<usize>)>> {
    let (uuid, _) = device_identity(ctx);
    let all = crate::exchange::all_gather_bytes(comm, &uuid, timeout, "comparing GPU UUIDs")?;
    Ok(group_shared(&all))
}

/// The shared groups of [`shared_gpus`] from every rank's 16 UUID bytes.
fn group_shared(uuids: &[Vec<u8>]) -> Vec<(String, Vec<usize>)> {
    let mut groups: Vec<(&[u8], Vec<usize>)> = Vec::new();
    for (rank, u) in uuids.iter().enumerate() {
        if u.iter().all(|&b| b == 0) {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| *g == &u[..]) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((u, vec![rank])),
        }
    }
    groups.into_iter().filter(|(_, r)| r.len() > 1).map(|(u, r)| (format_uuid(u), r)).collect()
}

/// A UUID as `nvidia-smi -L` prints it: `GPU-` and 8-4-4-4-12 hex digits.
fn format_uuid(u: &[u8]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    if hex.len() != 32 {
        return format!("GPU-{hex}");
    }
    format!("GPU-{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Find which ranks of `node` share a GPU (by device UUID) and whether every pair of distinct
/// GPUs used can access each other (P2P), for the custom IPC allreduce.
///
/// # Collective
/// Every rank of `node` (one node).
///
/// # Errors
/// [`crate::Error::PeerTimeout`] when a rank does not arrive within `timeout`.
pub(crate) fn gpu_layout<C: mpi::traits::Communicator>(
    node: &C,
    ctx: &Context,
    timeout: Duration,
) -> Result<GpuLayout> {
    const STEP: &str = "finding the node's GPU layout";
    let (uuid, bus) = device_identity(ctx);
    let mut mine = uuid.to_vec();
    mine.extend_from_slice(bus.as_bytes());
    let all = crate::exchange::all_gather_bytes(node, &mine, timeout, STEP)?;
    let ids: Vec<(&[u8], String)> = all
        .iter()
        .map(|b| (&b[..16.min(b.len())], String::from_utf8_lossy(b.get(16..).unwrap_or(&[])).into_owned()))
        .collect();
    let mut distinct: Vec<&[u8]> = Vec::new();
    let device_of_rank: Vec<usize> = ids
        .iter()
        .map(|(u, _)| {
            distinct.iter().position(|d| d == u).unwrap_or_else(|| {
                distinct.push(u);
                distinct.len() - 1
            })
        })
        .collect();
    let max_ranks_per_device =
        (0..distinct.len()).map(|d| device_of_rank.iter().filter(|&&x| x == d).count()).max().unwrap_or(1);

    // Each rank checks that its GPU can reach every other GPU in use; all must agree.
    let mut problem: Option<String> = None;
    let mut nvlink = true;
    if uuid == [0; 16] {
        problem = Some("the driver reports no UUID for this rank's GPU".into());
    }
    for (u, peer_bus) in &ids {
        if problem.is_some() || *u == &uuid[..] {
            continue;
        }
        match p2p_access(ctx, peer_bus) {
            Ok(true) => nvlink &= native_atomics(ctx, peer_bus),
            Ok(false) => {
                problem = Some(format!("GPU {bus} cannot access GPU {peer_bus} directly (no P2P / NVLink path)"))
            }
            Err(e) => problem = Some(format!("cannot check P2P from GPU {bus} to GPU {peer_bus}: {e}")),
        }
    }
    // Two bits per rank: P2P to every GPU in use, NVLink to every GPU in use.
    let verdict = u64::from(problem.is_none()) | (u64::from(nvlink) << 1);
    let all = crate::exchange::all_min_u64(node, verdict, timeout, STEP)?;
    let all_nvlink = crate::exchange::all_min_u64(node, verdict >> 1, timeout, STEP)?;
    let unsupported = match (all & 1, problem) {
        (1, _) => None,
        (_, Some(p)) => Some(p),
        (_, None) => Some("another rank's GPU lacks P2P access to a GPU in use (see its log)".into()),
    };
    Ok(GpuLayout { device_of_rank, max_ranks_per_device, unsupported, full_nvlink: all_nvlink == 1 })
}

/// A readable report of the node's GPUs as tpcomm sees them: one line per rank (its GPU, name,
/// PCI bus id) and, per pair of distinct GPUs, whether the driver allows peer access (P2P) and
/// native atomics (NVLink), then the layout verdict of [`gpu_layout`]. For the topology step of
/// multi-GPU runs (`gpu_check --topology`).
///
/// # Collective
/// Every rank of `node` (one node); the same text on every rank.
///
/// # Errors
/// [`crate::Error::PeerTimeout`] when a rank does not arrive within `timeout`.
pub(crate) fn link_report<C: mpi::traits::Communicator>(node: &C, ctx: &Context, timeout: Duration) -> Result<String> {
    const STEP: &str = "the topology report";
    let (_, bus) = device_identity(ctx);
    let name = gpu_name(crate::runtime::ordinal(ctx)).unwrap_or_else(|| "unknown GPU".into());
    let buses = crate::exchange::all_gather_bytes(node, bus.as_bytes(), timeout, STEP)?;
    let buses: Vec<String> = buses.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    let mut row = format!("rank {}: GPU {} {name} (bus {bus})", node.rank(), crate::runtime::ordinal(ctx));
    let mut seen: Vec<&str> = Vec::new();
    for peer in &buses {
        if *peer == bus || seen.contains(&peer.as_str()) {
            continue;
        }
        seen.push(peer);
        let p2p = match p2p_access(ctx, peer) {
            Ok(true) => "P2P yes",
            Ok(false) => "P2P NO",
            Err(_) => "P2P unknown",
        };
        let nvlink = if native_atomics(ctx, peer) { "NVLink (native atomics) yes" } else { "NVLink no" };
        row.push_str(&format!("\n  -> bus {peer}: {p2p}, {nvlink}"));
    }
    let rows = crate::exchange::all_gather_bytes(node, row.as_bytes(), timeout, STEP)?;
    let mut text: String = rows.iter().map(|r| String::from_utf8_lossy(r).into_owned() + "\n").collect();
    let layout = gpu_layout(node, ctx, timeout)?;
    text.push_str(&format!(
        "layout: {} GPU(s) for {} rank(s), at most {} rank(s) per GPU, full NVLink {}, IPC kernels {}\n",
        layout.devices(),
        layout.device_of_rank.len(),
        layout.max_ranks_per_device,
        layout.full_nvlink,
        layout.unsupported.as_deref().unwrap_or("supported")
    ));
    Ok(text)
}

/// Whether the link from this context's device to `peer_bus` supports native atomics (NVLink
/// does, PCIe peer access does not; on AMD GPUs, as HIP reports it); false when the driver
/// cannot tell.
fn native_atomics(ctx: &Context, peer_bus: &str) -> bool {
    crate::runtime::native_atomics(ctx, peer_bus)
}

/// Whether this context's device can access the device with PCI bus id `peer_bus` directly.
fn p2p_access(ctx: &Context, peer_bus: &str) -> Result<bool, String> {
    crate::runtime::p2p_access(ctx, peer_bus)
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

#[cfg(test)]
mod shared_tests {
    use super::*;

    #[test]
    fn shared_gpus_are_grouped_by_uuid() {
        let a = vec![1u8; 16];
        let b = vec![2u8; 16];
        let none = vec![0u8; 16];
        let groups = group_shared(&[a.clone(), b.clone(), a.clone(), none.clone(), none, b.clone(), vec![3u8; 16]]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0], ("GPU-01010101-0101-0101-0101-010101010101".to_string(), vec![0, 2]));
        assert_eq!(groups[1].1, vec![1, 5]);
        assert!(group_shared(&[a, b]).is_empty());
    }
}
