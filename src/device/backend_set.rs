//! The device backends of one communicator, built once by `init_device`.
//!
//! [`BackendSet::build`] is collective and bounded: it finds the node's GPU layout, builds every
//! backend that layout allows (custom and packet among the node's ranks, NCCL among all ranks
//! and, across nodes, among the ranks of each local index), and agrees over all ranks on one
//! capability list, so every rank's plan is the same. A backend that cannot be built is a
//! missing capability with its reason (the dispatch falls back: NCCL for layouts without IPC
//! kernels, chunked IPC calls without NCCL); only a rank that does not arrive is an error.

use crate::algo::BackendKind;
use crate::backend::custom::{CustomAllreduce, CustomOptions, FaultTarget};
use crate::backend::mock::MockBackend;
use crate::backend::packet::{PacketAllreduce, PacketOptions};
use crate::backend::quick::{QuickAllreduce, QuickOptions};
use crate::backend::DeviceBackend;
use crate::backend::{collective_library_present, Collective, LIBRARY};
use crate::bootstrap::Bootstrap;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::exchange;
use crate::fault::FaultWord;
use crate::plan::{Caps, Group};
use crate::runtime::protocol::MAX_RANKS;
use crate::runtime::Context;
use std::sync::Arc;

/// One backend instance and the group it reduces among.
struct Member {
    kind: BackendKind,
    group: Group,
    backend: Box<dyn DeviceBackend>,
}

/// Every device backend of a communicator, and what every rank can use.
pub(crate) struct BackendSet {
    pub caps: Caps,
    members: Vec<Member>,
    /// Notes for `TPCOMM_DEBUG` output: what was built and why something was not.
    pub notes: Vec<String>,
}

/// The order of the capability bits exchanged between ranks.
const SLOTS: [(BackendKind, Group); 5] = [
    (BackendKind::Custom, Group::Node),
    (BackendKind::Packet, Group::Node),
    (BackendKind::Quick, Group::Node),
    (BackendKind::Nccl, Group::World),
    (BackendKind::Nccl, Group::Cross),
];

impl BackendSet {
    /// The backend for `(kind, group)`.
    ///
    /// # Errors
    /// [`Error::Internal`] when the plan names a backend that was not built (the plan checks
    /// the capabilities, so this is a bug).
    pub(crate) fn get(&mut self, kind: BackendKind, group: Group) -> Result<&mut dyn DeviceBackend> {
        match self.members.iter_mut().find(|m| m.kind == kind && m.group == group) {
            Some(m) => Ok(m.backend.as_mut()),
            None => Err(Error::Internal(format!("the plan used {kind:?} among {group:?}, which was not built"))),
        }
    }

    /// Every backend built on this rank (a backend can be built here and still be missing from
    /// the capabilities, when another rank lacks it).
    pub(crate) fn all(&mut self) -> impl Iterator<Item = &mut dyn DeviceBackend> + '_ {
        self.members.iter_mut().map(|m| m.backend.as_mut() as &mut dyn DeviceBackend)
    }

    /// Build every backend the layout allows.
    ///
    /// # Collective
    /// Every rank, with the same configuration.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] when a rank does not arrive; [`Error::Cuda`] when the GPU cannot be
    /// used at all. A backend that cannot be built is not an error (its reason is kept).
    pub(crate) fn build(boot: &Bootstrap, config: &Config, ctx: &Arc<Context>, fault: FaultTarget) -> Result<Self> {
        let l = &boot.layout;
        let t = boot.timeout;
        let mut set = BackendSet { caps: Caps::none(), members: Vec::new(), notes: Vec::new() };
        let mut missing: Vec<(BackendKind, String)> = Vec::new();

        // The IPC kernels: every GPU pair of the node must reach each other, and a node of more
        // than two GPUs must be all NVLink (over PCIe they lose to NCCL and may never complete
        // when peer writes are slow, as vLLM found).
        let ipc = if l.ranks_per_node > MAX_RANKS {
            Err(format!("{} ranks share a node and the IPC kernels span at most {MAX_RANKS}", l.ranks_per_node))
        } else {
            let layout = crate::topology::gpu_layout(boot.node(), ctx, t)?;
            match layout.unsupported {
                Some(reason) => Err(reason),
                None if !layout.full_nvlink && layout.devices() > 2 => Err(format!(
                    "{} GPUs without NVLink between every pair: over PCIe the IPC kernels are slower than NCCL",
                    layout.devices()
                )),
                None => Ok(layout),
            }
        };
        match ipc {
            Ok(layout) => {
                let opts = CustomOptions {
                    max_bytes: config.custom_max_bytes,
                    timeout: t,
                    ranks_per_device: layout.max_ranks_per_device,
                    cache_dir: Some(config.cache_dir()),
                    fault,
                    pdl: config.pdl,
                    max_blocks: config.custom_max_blocks,
                };
                match CustomAllreduce::new(boot.node(), ctx, &opts) {
                    Ok(custom) => {
                        let small = custom
                            .small_grid_blocks()
                            .map(|b| format!(", {b} for the small-grid kernels below them"))
                            .unwrap_or_default();
                        let direct = custom
                            .direct_cap_below_limits()
                            .map(|b| format!(", the direct two-shot at most {b}"))
                            .unwrap_or_default();
                        set.notes.push(format!(
                            "custom allreduce: {} ranks, {} per GPU at most, full NVLink {}, {} blocks of {} threads ({} for large calls{small}{direct}), \
                             {} staging bytes, \
                             PDL {}, kernels from disk cache: {}",
                            l.ranks_per_node,
                            layout.max_ranks_per_device,
                            layout.full_nvlink,
                            custom.max_blocks(),
                            crate::runtime::protocol::AR_THREADS,
                            custom.large_blocks(),
                            config.custom_max_bytes,
                            if config.pdl { "on" } else { "off" },
                            custom.kernels_from_disk_cache()
                        ));
                        set.push(BackendKind::Custom, Group::Node, Box::new(custom));
                        let opts = PacketOptions {
                            max_bytes: config.packet_buffer_bytes,
                            timeout: t,
                            ranks_per_device: layout.max_ranks_per_device,
                            block_threads: config.packet_threads,
                            cache_dir: Some(config.cache_dir()),
                            fault,
                            pdl: config.pdl,
                        };
                        match PacketAllreduce::new(boot.node(), ctx, &opts) {
                            Ok(p) => {
                                set.notes.push(format!("packet allreduce: {} blocks max", p.max_blocks()));
                                set.push(BackendKind::Packet, Group::Node, Box::new(p));
                            }
                            Err(e) => missing.push((BackendKind::Packet, fatal_or_reason(e)?)),
                        }
                        // Quick only when asked for (TPCOMM_QUICK): its inboxes cost memory.
                        if config.quick.is_none() {
                            missing.push((BackendKind::Quick, "TPCOMM_QUICK is off".into()));
                        } else {
                            let opts = QuickOptions {
                                max_bytes: config.quick_max_bytes,
                                timeout: t,
                                ranks_per_device: layout.max_ranks_per_device,
                                cache_dir: Some(config.cache_dir()),
                                fault,
                                pdl: config.pdl,
                            };
                            match QuickAllreduce::new(boot.node(), ctx, &opts) {
                                Ok(q) => {
                                    set.notes.push(format!(
                                        "quick allreduce: {} blocks max, {} bytes max",
                                        q.max_blocks(),
                                        config.quick_max_bytes
                                    ));
                                    set.push(BackendKind::Quick, Group::Node, Box::new(q));
                                }
                                Err(e) => missing.push((BackendKind::Quick, fatal_or_reason(e)?)),
                            }
                        }
                    }
                    Err(e) => {
                        let why = fatal_or_reason(e)?;
                        for kind in [BackendKind::Packet, BackendKind::Quick] {
                            missing.push((kind, why.clone()));
                        }
                        missing.push((BackendKind::Custom, why));
                    }
                }
            }
            Err(why) => {
                for kind in [BackendKind::Packet, BackendKind::Quick] {
                    missing.push((kind, why.clone()));
                }
                missing.push((BackendKind::Custom, why));
            }
        }

        // NCCL among all ranks (never used in deterministic mode, so not built there).
        let library = exchange::all_min_u64(
            boot.world(),
            u64::from(collective_library_present()),
            t,
            "looking for the collective library",
        )? == 1;
        if config.deterministic {
            missing.push((BackendKind::Nccl, "deterministic mode never uses NCCL".into()));
        } else if !library {
            missing.push((BackendKind::Nccl, format!("{LIBRARY} cannot be loaded on every rank")));
        } else {
            match Collective::new(boot.world(), ctx, t) {
                Ok(n) => {
                    set.notes.push(format!("{LIBRARY}: {} ranks, version code {}", n.world_size(), n.version()));
                    set.push(BackendKind::Nccl, Group::World, Box::new(n));
                }
                Err(e) => missing.push((BackendKind::Nccl, fatal_or_reason(e)?)),
            }
            // NCCL among the ranks of each local index, for the hierarchy's cross-node leg.
            if l.nodes > 1 && set.members.iter().any(|m| m.kind == BackendKind::Nccl) {
                exchange::barrier(boot.world(), t, "building NCCL across nodes")?;
                let built = match boot.cross_communicator() {
                    Some(cross) => Collective::new(&*cross, ctx, t).map(Some),
                    None => Ok(None),
                };
                match exchange::agree(boot.world(), built, t, "building NCCL across nodes") {
                    Ok(Some(n)) => set.push(BackendKind::Nccl, Group::Cross, Box::new(n)),
                    Ok(None) => set.caps_local_only(BackendKind::Nccl, Group::Cross),
                    Err(e) => set.notes.push(format!("NCCL across nodes unavailable: {}", fatal_or_reason(e)?)),
                }
            }
        }
        set.agree_caps(boot, missing)?;
        Ok(set)
    }

    /// The CPU stand-in: one [`MockBackend`] per backend slot the layout has, each reducing host
    /// memory over its group's MPI communicator.
    ///
    /// # Collective
    /// Every rank.
    pub(crate) fn mock(boot: &Bootstrap, config: &Config, fault: FaultWord) -> Result<Self> {
        let mut set =
            BackendSet { caps: Caps::none(), members: Vec::new(), notes: vec!["mock device backends".into()] };
        let t = boot.timeout;
        let mock = |comm: &mpi::topology::SimpleCommunicator, kind| Box::new(MockBackend::new(comm, kind, t, fault));
        set.push(BackendKind::Custom, Group::Node, mock(boot.node(), BackendKind::Custom));
        set.push(BackendKind::Packet, Group::Node, mock(boot.node(), BackendKind::Packet));
        let mut missing = Vec::new();
        if config.quick.is_some() {
            set.push(BackendKind::Quick, Group::Node, mock(boot.node(), BackendKind::Quick));
        } else {
            missing.push((BackendKind::Quick, "TPCOMM_QUICK is off".into()));
        }
        if config.deterministic {
            missing.push((BackendKind::Nccl, "deterministic mode never uses NCCL".into()));
        } else {
            set.push(BackendKind::Nccl, Group::World, mock(boot.world(), BackendKind::Nccl));
            if boot.layout.nodes > 1 {
                exchange::barrier(boot.world(), t, "building the mock cross-node backend")?;
                match boot.cross_communicator() {
                    Some(cross) => set.push(BackendKind::Nccl, Group::Cross, mock(&cross, BackendKind::Nccl)),
                    None => set.caps_local_only(BackendKind::Nccl, Group::Cross),
                }
            }
        }
        set.agree_caps(boot, missing)?;
        Ok(set)
    }

    fn push(&mut self, kind: BackendKind, group: Group, backend: Box<dyn DeviceBackend>) {
        self.caps.add(kind, group);
        self.members.push(Member { kind, group, backend });
    }

    /// A rank that owns no shard of the cross-node leg builds no cross-node backend, but its
    /// plans still may use the hierarchy (they skip that step).
    fn caps_local_only(&mut self, kind: BackendKind, group: Group) {
        self.caps.add(kind, group);
    }

    /// Keep only what every rank has, so every rank plans alike.
    fn agree_caps(&mut self, boot: &Bootstrap, missing: Vec<(BackendKind, String)>) -> Result<()> {
        let mine: u64 = SLOTS.iter().enumerate().filter(|(_, (k, g))| self.caps.has(*k, *g)).map(|(i, _)| 1 << i).sum();
        let all = exchange::all_gather_u64(boot.world(), mine, boot.timeout, "agreeing on the device backends")?;
        let common = all.iter().fold(u64::MAX, |acc, m| acc & m);
        let mut caps = Caps::none();
        for (i, &(kind, group)) in SLOTS.iter().enumerate() {
            if common & (1 << i) != 0 {
                caps.add(kind, group);
            } else if mine & (1 << i) != 0 {
                let r = all.iter().position(|m| m & (1 << i) == 0).unwrap_or(0);
                caps.set_missing(kind, format!("not available on rank {r} (see its log)"));
            }
        }
        for (kind, why) in missing {
            caps.set_missing(kind, why);
        }
        self.caps = caps;
        Ok(())
    }
}

/// A backend that could not be built: its reason, unless the failure leaves the ranks out of
/// step (a rank that did not arrive), which ends `init_device` on every rank.
fn fatal_or_reason(e: Error) -> Result<String> {
    match e {
        Error::PeerTimeout { .. } => Err(e),
        other => Ok(other.to_string()),
    }
}
