//! The dispatch: which algorithm serves a call, as a plan of steps.
//!
//! Pure: a [`Request`] (bytes, dtype, layout, the backends every rank built, alignment, a forced
//! algorithm) goes in, a [`Plan`] comes out. Nothing here touches MPI, CUDA or the machine, so
//! every decision is the same on every rank that sees the same request, and every decision is
//! unit-tested. This is the only place that decides between backends; backends never know of
//! each other.
//!
//! A plan is data: a list of [`Step`]s over element ranges of the call. An ordinary call is one
//! step; a chunked call is one step per chunk; a call across nodes is a node step, a cross-node
//! step on the rank's shard, two zero fills and a node step. The device layer runs the steps in
//! order on the caller's stream and never re-enters the dispatch.
//!
//! `TPCOMM_ALGO` (or [`crate::CallOptions::algo`]) forces one algorithm; a forced algorithm that
//! cannot serve the call is an error naming why, on every rank, never a silent fallback and
//! never a wrong result.

use crate::algo::{Algo, BackendKind, Memory, Span};
use crate::config::Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::norm::Fusion;
use crate::quant::Codec;
use std::fmt;
use std::ops::Range;

/// Which ranks a step reduces among.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Group {
    /// Every rank of the communicator.
    World,
    /// The ranks of this rank's node.
    Node,
    /// The ranks of this rank's local index on every node (the hierarchy's cross-node leg).
    Cross,
}

/// Where a reduce step reads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    /// The caller's input.
    Input,
    /// The caller's output (in place, after an earlier step wrote it).
    Output,
}

/// What a step does to `range` (elements) of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `output[range] = sum over group of src[range]` with `algo` (an algorithm that has a
    /// backend).
    Reduce { algo: Algo, group: Group, src: Src },
    /// `output[range] = input[range]` (nothing when they are the same memory).
    Copy,
    /// `output[range] = 0`.
    Zero,
    /// The reduction of [`Op::Reduce`] (from the input) with residual add + RMSNorm as its
    /// epilogue: `output` is the call's `norm_out` ([`crate::norm`]). Always the whole call.
    ReduceAddRmsNorm { algo: Algo, group: Group },
    /// Residual add + RMSNorm of the sums an earlier step left in `output` (the split path),
    /// with the device layer's own kernel. Always the whole call.
    AddRmsNorm,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub op: Op,
    pub range: Range<usize>,
}

/// How one call is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The algorithm the call is served by (chunked and hierarchical are made of other steps).
    pub algo: Algo,
    pub steps: Vec<Step>,
    /// Why this algorithm, for `TPCOMM_DEBUG` output.
    pub reason: &'static str,
}

impl Plan {
    /// The norm is fused into the reduction.
    pub(crate) fn fused(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.op, Op::ReduceAddRmsNorm { .. }))
    }
}

/// The fused op's part of a request ([`crate::norm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NormRequest {
    /// Elements per row.
    pub hidden: usize,
    pub fusion: Fusion,
}

/// The backends every rank built (the same on every rank: agreed at `init_device`), and why
/// each missing one is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Built on every rank: `(kind, group)`.
    built: Vec<(BackendKind, Group)>,
    /// Why a backend is not there, by kind.
    missing: Vec<(BackendKind, String)>,
}

impl Caps {
    /// No device backend at all.
    pub(crate) fn none() -> Self {
        Caps::default()
    }

    pub(crate) fn add(&mut self, kind: BackendKind, group: Group) {
        if !self.has(kind, group) {
            self.built.push((kind, group));
        }
    }

    pub(crate) fn set_missing(&mut self, kind: BackendKind, why: impl Into<String>) {
        if !self.missing.iter().any(|(k, _)| *k == kind) {
            self.missing.push((kind, why.into()));
        }
    }

    pub(crate) fn has(&self, kind: BackendKind, group: Group) -> bool {
        self.built.contains(&(kind, group))
    }

    /// Why `kind` is missing, for error messages.
    pub(crate) fn why_missing(&self, kind: BackendKind) -> &str {
        self.missing.iter().find(|(k, _)| *k == kind).map_or("it was not built on every rank", |(_, w)| w.as_str())
    }
}

/// The node layout a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub world: usize,
    pub nodes: usize,
    pub local_rank: usize,
    pub ranks_per_node: usize,
    /// The fewest ranks on any node: shards of the cross-node leg.
    pub min_ranks_per_node: usize,
}

impl Shape {
    /// One node of `world` ranks.
    #[cfg(test)]
    pub(crate) fn one_node(world: usize, local_rank: usize) -> Self {
        Shape { world, nodes: 1, local_rank, ranks_per_node: world, min_ranks_per_node: world }
    }
}

/// What the dispatch knows about one device call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// Elements per rank.
    pub len: usize,
    pub dtype: DType,
    pub shape: Shape,
    pub caps: &'a Caps,
    /// Input and output pointers are aligned as the IPC kernels need (16 bytes).
    pub aligned: bool,
    /// The output is the input (one-shot then stages the input: a copy more).
    pub in_place: bool,
    /// An algorithm the caller forced for this call (over the configuration's).
    pub forced: Option<Algo>,
    /// Every peer reaches this call's input and output where they are (registered buffers, or
    /// a call captured in a registration): two-shot then stores straight into the outputs and
    /// needs no staging or scratch, so it serves sizes above `custom_max_bytes` where NCCL does
    /// not (instead of chunks). A rank that disagrees runs another kernel, and the call tags
    /// stop both with a mismatch.
    pub peer_rows: bool,
    /// Residual add + RMSNorm after the sum (`all_reduce_add_rms_norm`).
    pub norm: Option<NormRequest>,
}

impl Request<'_> {
    fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// Size thresholds between algorithms for one world size, from defaults, a tuned file and
/// `TPCOMM_*` overrides. Printed by `allreduce_perf --show-dispatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchTable {
    pub(crate) host_oneshot_max_bytes: usize,
    pub(crate) packet_max_bytes: usize,
    pub(crate) oneshot_max_bytes: usize,
    pub(crate) custom_max_bytes: usize,
    pub(crate) packet_buffer_bytes: usize,
    pub(crate) deterministic: bool,
    pub(crate) forced: Option<Algo>,
    pub(crate) quick: Option<Codec>,
    pub(crate) quick_min_bytes: usize,
    pub(crate) quick_max_bytes: usize,
    pub(crate) fused_norm_max_bytes: usize,
    /// Within `fused_norm_max_bytes`: the fused one-shot's largest message under Auto
    /// ([`fused_oneshot_max_bytes`]); the fused two-shot takes larger ones.
    fused_oneshot_max_bytes: usize,
}

/// Largest host message (bytes per rank) reduced by one-shot for `world` ranks. One-shot makes
/// every rank read all `n` inputs (its own where it is, in place too), two-shot reads each input
/// once but pays a second barrier. At 2 ranks on the 16 cores of the H200 machine one-shot wins
/// to 128 KiB and two-shot from 256 KiB (bench/RESULTS.md, "One-shot on 16 blocks ...", item 4:
/// in place 64 KiB 13.36-14.59 us against 19.32, 128 KiB 25.05-27.29 against 27.91-28.52,
/// 256 KiB 52.05-60.94 against 50.05-50.41); on the development VM they are even at 128 KiB, so
/// the limit is 64 KiB. One-shot's reads grow with `n`, so at more ranks the limit falls to a
/// few KiB (two-shot at 4 and 8 ranks is 1.64-3.19x `MPI_Allreduce` at 4-64 KiB, item 5).
/// `tune()` measures it per machine.
const fn host_oneshot_max_bytes(world: usize) -> usize {
    if world <= 2 {
        64 << 10
    } else {
        (8 << 10) / world
    }
}

/// Largest device message reduced one-shot (out of place) for `world` ranks. One-shot reads
/// (n-1)*S per rank against two-shot's ~2(n-1)/n*S plus a second barrier, so the crossover falls
/// as n grows. Measured on one H200 shared by all ranks, output from a stream-ordered pool (so
/// two-shot goes through its scratch; bench/RESULTS.md, "Two-shot stored directly"): at 2 ranks
/// one-shot wins at every size to 16 MiB (8 MiB: 21.0 us against 25.6), at 4 ranks up to 1 MiB
/// (2 MiB is a tie), at 8 up to 128 KiB (8.9 us against 10.7; 256 KiB: 12.3 against 10.8). On
/// GPUs of their own the NVLink reads shift it: `tune()` measures.
///
/// In place, one-shot is never chosen above the packet sizes: it would first copy its input into
/// the staging buffer (a peer still reads it while the output is written), while two-shot stores
/// each reduced shard straight into every rank's buffer; the same H200 measured two-shot ahead
/// in place from 32 KiB at every rank count (2 ranks 32 KiB: 5.3 us against 6.2; 8 ranks: 8.9
/// against 10.2).
pub(crate) const fn oneshot_max_bytes(world: usize) -> usize {
    if world <= 2 {
        usize::MAX
    } else if world <= 4 {
        1 << 20
    } else {
        128 << 10
    }
}

/// Largest device message reduced by packets (Lamport push) for `world` ranks. Lamport pushes
/// `(n - 1) * S` bytes per rank but skips one-shot's two barriers; on one H200 shared by all
/// ranks it beats one-shot and in-place two-shot up to 512 KiB at 2 ranks (in place 4.99 us
/// against 5.64; out of place within 0.06 of one-shot), 128 KiB at 4 (5.04 against 5.11 / 6.52)
/// and 32 KiB at 8 (6.30 against 6.27 / 8.10), and loses at twice those sizes
/// (bench/RESULTS.md, "Late PDL release, Lamport re-armed by its reader").
pub(crate) const fn packet_max_bytes(world: usize) -> usize {
    if world <= 2 {
        512 << 10
    } else if world <= 4 {
        128 << 10
    } else {
        32 << 10
    }
}

/// Smallest message the dispatch hands to a quick codec (`TPCOMM_QUICK`) for `world` ranks:
/// where quantization starts to pay against the unquantized two-shot over a real interconnect,
/// as QuickReduce measured it on MI300X (1 MiB at 2 ranks, 2 MiB at 4, 4 MiB at 8;
/// ../RESEARCH). On ranks sharing one GPU the interconnect is that GPU's memory and the
/// codecs never pay (bench/RESULTS.md), so this cannot be measured there.
pub(crate) const fn quick_min_bytes(world: usize) -> usize {
    if world <= 2 {
        1 << 20
    } else if world <= 4 {
        2 << 20
    } else {
        4 << 20
    }
}

/// Largest message (bytes per rank) `all_reduce_add_rms_norm` runs fused by default (one kernel:
/// the fused one-shot up to [`fused_oneshot_max_bytes`], the fused two-shot above it where every
/// peer reaches the input and norm_out); larger messages run the allreduce and then the norm
/// kernel. Measured on one H200 shared by all ranks, bf16, graphs, hidden 4096 and 8192, at
/// `2b8f02b` (bench/RESULTS.md, "Fused two-shot"; sweeps to 2 MiB): the fused kernel the rule
/// below picks beats the split path at every size through 2 MiB at 2, 4 and 8 ranks, in place
/// and not (split/fused 1.06-1.54); above 2 MiB it was not measured with these kernels (at
/// `15f7f26` the fused kernels lost at 4 MiB at 2 and 8 ranks and at 8 MiB at 4). 3 and 5-7
/// ranks follow 4 and 8 (not measured).
pub(crate) const fn fused_norm_max_bytes(_world: usize) -> usize {
    2 << 20
}

/// Largest message the fused one-shot takes under [`Fusion::Auto`] (within
/// [`fused_norm_max_bytes`]); above it, at 5-8 ranks, the fused two-shot serves buffers every
/// peer reaches, and other calls split. At `2b8f02b` (64 blocks of rows; bench/RESULTS.md, "Fused
/// two-shot"): at 2 and 4 ranks the one-shot beats both the split path and the fused two-shot at
/// every size through 2 MiB (4 ranks hidden 4096, 2 MiB: 14.11 / 14.93 us out of place / in place
/// against the two-shot's 16.04 / 16.18 and split's 18.43 / 18.10); at 8 ranks, where the shared
/// device leaves it 33 blocks, it ties the two-shot at 256 KiB (10.87 / 10.66 against 10.96 /
/// 11.11 at hidden 4096, 9.82 / 10.32 against 9.74 / 9.74 at 8192) and loses from 512 KiB
/// (14.55 / 14.70 against 12.94 / 13.06; split 14.58 / 14.68).
pub(crate) const fn fused_oneshot_max_bytes(world: usize) -> usize {
    if world <= 4 {
        2 << 20
    } else {
        256 << 10
    }
}

/// Rows of at least this many bytes take the fused two-shot in place under [`Fusion::Auto`] at
/// every size within the fused limit (where every peer reaches the buffers): the fused one-shot
/// in place writes norm_out only after its end barrier, and at 8 ranks its blocks read every
/// rank's whole row. At `2b8f02b` (bench/RESULTS.md, "Fused two-shot"), 8 ranks, in place, the
/// two-shot against the one-shot: hidden 8192 bf16 (16 KiB rows) 1 / 2 / 4 / 8 / 16 tokens 8.65 /
/// 8.77 / 8.99 / 9.22 / 9.74 us against 9.06 / 9.02 / 9.27 / 9.54 / 10.32; hidden 4096 (8 KiB)
/// 8.04 / 8.17 / 8.48 / 8.99 / 9.26 against 7.26 / 7.22 / 7.44 / 7.82 / 8.49 (the one-shot wins).
/// Out of place the two are within 0.2 us at 16 KiB rows, so out of place keeps the byte rule.
/// 2-4 ranks: never (the one-shot wins there at every size through 2 MiB); 5-7 ranks follow 8
/// (not measured).
pub(crate) const fn fused_twoshot_in_place_row_bytes(world: usize) -> usize {
    if world <= 4 {
        usize::MAX
    } else {
        16 << 10
    }
}

impl DispatchTable {
    /// The table for a configuration and a world size.
    pub(crate) fn new(config: &Config, world_size: usize) -> Self {
        DispatchTable {
            host_oneshot_max_bytes: config.host_oneshot_max_bytes.unwrap_or(host_oneshot_max_bytes(world_size)),
            packet_max_bytes: config
                .packet_max_bytes
                .unwrap_or(packet_max_bytes(world_size))
                .min(config.packet_buffer_bytes),
            oneshot_max_bytes: config.oneshot_max_bytes.unwrap_or(oneshot_max_bytes(world_size)),
            custom_max_bytes: config.custom_max_bytes,
            packet_buffer_bytes: config.packet_buffer_bytes,
            deterministic: config.deterministic,
            forced: config.algo,
            quick: config.quick,
            quick_min_bytes: config.quick_min_bytes.unwrap_or(quick_min_bytes(world_size)),
            quick_max_bytes: config.quick_max_bytes,
            fused_norm_max_bytes: config.fused_norm_max_bytes.unwrap_or(fused_norm_max_bytes(world_size)),
            fused_oneshot_max_bytes: fused_oneshot_max_bytes(world_size),
        }
    }

    /// Largest host message (bytes per rank) reduced one-shot.
    pub fn host_oneshot_max_bytes(&self) -> usize {
        self.host_oneshot_max_bytes
    }

    /// Largest device message (bytes per rank) reduced by LL packets.
    pub fn packet_max_bytes(&self) -> usize {
        self.packet_max_bytes
    }

    /// Largest device message (bytes per rank) reduced one-shot.
    pub fn oneshot_max_bytes(&self) -> usize {
        self.oneshot_max_bytes
    }

    /// Largest device message (bytes per rank) of one IPC kernel call (their staging size).
    pub fn custom_max_bytes(&self) -> usize {
        self.custom_max_bytes
    }

    /// Largest message (bytes per rank) `all_reduce_add_rms_norm` fuses.
    pub fn fused_norm_max_bytes(&self) -> usize {
        self.fused_norm_max_bytes
    }

    /// Largest message (bytes per rank) `all_reduce_add_rms_norm` fuses into the one-shot (within
    /// [`DispatchTable::fused_norm_max_bytes`]; larger ones take the fused two-shot where every
    /// peer reaches the input and norm_out, and split elsewhere).
    pub fn fused_oneshot_max_bytes(&self) -> usize {
        self.fused_oneshot_max_bytes.min(self.fused_norm_max_bytes)
    }

    /// The host algorithm for `len` elements of `dtype`, or the forced one.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] when the forced algorithm does not reduce host memory.
    pub(crate) fn host(&self, len: usize, dtype: DType, forced: Option<Algo>) -> Result<Algo> {
        if let Some(algo) = forced.or(self.forced) {
            if algo.memory() != Memory::Host {
                return Err(Error::usage(
                    format!("algorithm {algo} on host memory"),
                    format!(
                        "{algo} reduces {} memory; pick one of {} or unset TPCOMM_ALGO",
                        algo.memory(),
                        Algo::names_for(Memory::Host)
                    ),
                ));
            }
            return Ok(algo);
        }
        Ok(if len * dtype.size() <= self.host_oneshot_max_bytes { Algo::HostOneShot } else { Algo::HostTwoShot })
    }

    /// The plan of a device call.
    ///
    /// Unforced: one rank copies; one node with the IPC kernels: packets up to
    /// `packet_max_bytes`, one-shot up to `oneshot_max_bytes`, two-shot up to
    /// `custom_max_bytes`, then NCCL (chunked IPC calls in deterministic mode or without NCCL);
    /// misaligned pointers and layouts without the IPC kernels go to NCCL; several nodes take
    /// the hierarchy up to `custom_max_bytes` and flat NCCL above.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] for a forced algorithm that cannot serve the call (memory kind,
    /// world size, nodes, a message over its buffers); [`Error::InvalidArgument`] for
    /// misaligned pointers where nothing else can take them; [`Error::Unsupported`] when no backend
    /// built here can serve it (saying why); [`Error::Config`] for NCCL forced in
    /// deterministic mode.
    pub(crate) fn device(&self, req: &Request) -> Result<Plan> {
        let plan = match req.forced.or(self.forced) {
            Some(algo) => {
                self.check_forced(algo, req)?;
                self.plan_of(algo, req, "forced")
            }
            None => {
                let (algo, reason) = self.choose(req)?;
                self.plan_of(algo, req, reason)
            }
        }?;
        match req.norm {
            Some(norm) => self.with_norm(plan, req, norm),
            None => Ok(plan),
        }
    }

    /// The plan of `all_reduce_add_rms_norm`: the fused kernel where it serves and [`Fusion::Auto`]
    /// (its limits) or [`Fusion::Fused`] says so, else `plan` and the norm step.
    fn with_norm(&self, mut plan: Plan, req: &Request, norm: NormRequest) -> Result<Plan> {
        let forced = req.forced.or(self.forced);
        let algo = match norm.fusion {
            Fusion::Split => None,
            Fusion::Fused => match self.fused_algo(req, forced) {
                Ok(algo) => Some(algo),
                Err(why) => return Err(Error::usage("the fused allreduce + RMSNorm (Fusion::Fused)", why)),
            },
            Fusion::Auto => self.auto_fused(req, norm.hidden, forced),
        };
        if let Some(algo) = algo {
            let op = Op::ReduceAddRmsNorm { algo, group: Group::Node };
            return Ok(Plan { algo, steps: vec![Step { op, range: 0..req.len }], reason: "fused" });
        }
        plan.steps.push(Step { op: Op::AddRmsNorm, range: 0..req.len });
        Ok(plan)
    }

    /// The fused kernel [`Fusion::Auto`] runs for `req` (rows of `hidden`), if any: within
    /// `fused_norm_max_bytes`, the fused one-shot up to [`fused_oneshot_max_bytes`], the fused
    /// two-shot above it, and in place on rows of [`fused_twoshot_in_place_row_bytes`], where every
    /// peer reaches the buffers; a forced allreduce keeps its own algorithm (one-shot within its
    /// limit, two-shot where it can serve).
    fn auto_fused(&self, req: &Request, hidden: usize, forced: Option<Algo>) -> Option<Algo> {
        let bytes = req.bytes();
        if bytes > self.fused_norm_max_bytes {
            return None;
        }
        let one_shot = bytes <= self.fused_oneshot_max_bytes;
        let long_rows = req.in_place && hidden * req.dtype.size() >= fused_twoshot_in_place_row_bytes(req.shape.world);
        let algo = match forced {
            None if req.peer_rows && (!one_shot || long_rows) => Algo::TwoShot,
            None | Some(Algo::OneShot) if one_shot => Algo::OneShot,
            Some(Algo::TwoShot) => Algo::TwoShot,
            _ => return None,
        };
        self.fused_algo(req, forced.or(Some(algo))).ok().filter(|_| forced.is_some() || self.quick_for(req).is_none())
    }

    /// The fused kernel that serves `req` with the allreduce `algo` (`None`: one-shot), or why
    /// none can.
    fn fused_algo(&self, req: &Request, algo: Option<Algo>) -> std::result::Result<Algo, String> {
        let s = req.shape;
        match algo {
            _ if s.world == 1 => Err("one rank: the allreduce is a copy".into()),
            _ if s.nodes > 1 => Err(format!("the ranks span {} nodes", s.nodes)),
            _ if !req.caps.has(BackendKind::Custom, Group::Node) => {
                Err(format!("the custom kernels are not available: {}", req.caps.why_missing(BackendKind::Custom)))
            }
            _ if !req.aligned => Err("the pointers are not 16-byte aligned".into()),
            // The fused two-shot stores each reduced piece into every rank's norm_out: no
            // staging, no scratch, any size, but only where every peer reaches both buffers.
            Some(Algo::TwoShot) if req.peer_rows => Ok(Algo::TwoShot),
            Some(Algo::TwoShot) => Err("the fused two-shot writes every rank's norm_out, so the input and norm_out \
                                        must lie in buffers every peer reaches (alloc_shared, or a captured graph)"
                .into()),
            _ if req.bytes() > self.custom_max_bytes => {
                Err(format!("{} bytes exceed TPCOMM_CUSTOM_MAX_BYTES ({})", req.bytes(), self.custom_max_bytes))
            }
            Some(algo) if algo != Algo::OneShot => Err(format!(
                "the allreduce is forced to {algo}, and the fused kernels are {} and {}",
                Algo::OneShot,
                Algo::TwoShot
            )),
            None if self.quick_for(req).is_some() => Err("TPCOMM_QUICK serves this size".into()),
            _ => Ok(Algo::OneShot),
        }
    }

    /// The unforced choice and its reason.
    fn choose(&self, req: &Request) -> Result<(Algo, &'static str)> {
        let s = req.shape;
        let nccl = req.caps.has(BackendKind::Nccl, Group::World) && !self.deterministic;
        if s.world == 1 {
            return Ok((Algo::Copy, "one rank"));
        }
        let ipc = req.caps.has(BackendKind::Custom, Group::Node);
        if s.nodes > 1 {
            let cross = req.caps.has(BackendKind::Nccl, Group::Cross);
            if ipc && cross && req.aligned && !self.deterministic && req.bytes() <= self.custom_max_bytes {
                return Ok((Algo::Hierarchical, "the ranks span several nodes"));
            }
            if nccl {
                return Ok((Algo::Nccl, "the ranks span several nodes"));
            }
            return Err(self.no_backend(req, "the ranks span several nodes"));
        }
        if !ipc || !req.aligned {
            let why = if !ipc {
                "the IPC kernels cannot run on this layout"
            } else {
                "the pointers are not 16-byte aligned, as the IPC kernels need"
            };
            if nccl {
                return Ok((Algo::Nccl, why));
            }
            if ipc && !req.aligned {
                return Err(misaligned("all_reduce", req));
            }
            return Err(self.no_backend(req, why));
        }
        if let Some(codec) = self.quick_for(req) {
            return Ok((Algo::quick(codec), "TPCOMM_QUICK, size"));
        }
        Ok(match self.within_node(req.bytes(), req.caps, req.in_place, req.peer_rows && !nccl) {
            Some(algo) => (algo, "size"),
            None if nccl => (Algo::Nccl, "over TPCOMM_CUSTOM_MAX_BYTES"),
            None if self.deterministic => (Algo::Chunked, "deterministic, over TPCOMM_CUSTOM_MAX_BYTES"),
            None => (Algo::Chunked, "over TPCOMM_CUSTOM_MAX_BYTES, and NCCL is not available"),
        })
    }

    /// The quick codec for a call among the ranks of one node, where `TPCOMM_QUICK` names one,
    /// the size is in its range and the mode is not deterministic.
    fn quick_for(&self, req: &Request) -> Option<Codec> {
        let codec = self.quick?;
        let bytes = req.bytes();
        let fits = (self.quick_min_bytes..=self.quick_max_bytes).contains(&bytes);
        (fits && !self.deterministic && req.dtype != DType::F64 && req.caps.has(BackendKind::Quick, Group::Node))
            .then_some(codec)
    }

    /// The IPC algorithm for `bytes` among the ranks of one node, `None` above the IPC limit.
    fn within_node(&self, bytes: usize, caps: &Caps, in_place: bool, peer_rows: bool) -> Option<Algo> {
        let oneshot = if in_place { 0 } else { self.oneshot_max_bytes };
        if bytes <= self.packet_max_bytes && caps.has(BackendKind::Packet, Group::Node) {
            Some(Algo::Lamport)
        } else if bytes <= oneshot.min(self.custom_max_bytes) {
            Some(Algo::OneShot)
        } else if bytes <= self.custom_max_bytes || peer_rows {
            Some(Algo::TwoShot)
        } else {
            None
        }
    }

    /// The error for a call no built backend can serve.
    fn no_backend(&self, req: &Request, why: &str) -> Error {
        if self.deterministic {
            return Error::Unsupported {
                what: "deterministic allreduce of device memory".into(),
                reason: format!(
                    "{why}, and NCCL, which would serve it, does not sum in a fixed rank order; unset \
                     TPCOMM_DETERMINISTIC, or reduce host copies of the data (host memory is deterministic)"
                ),
            };
        }
        Error::Unsupported {
            what: "allreduce of device memory".into(),
            reason: format!("{why}, and NCCL cannot run here: {}", req.caps.why_missing(BackendKind::Nccl)),
        }
    }

    /// Whether a forced `algo` can serve `req`: the same verdict on every rank.
    fn check_forced(&self, algo: Algo, req: &Request) -> Result<()> {
        let info = algo.info();
        let what = || format!("forced algorithm {algo} (TPCOMM_ALGO or CallOptions)");
        if info.memory != Memory::Device {
            return Err(Error::usage(
                what(),
                format!(
                    "{algo} reduces host memory; on device memory pick one of {} or unset TPCOMM_ALGO",
                    Algo::names_for(Memory::Device)
                ),
            ));
        }
        // A lossy codec is reproducible bit for bit: asked for by name, deterministic mode lets it be.
        if !info.rank_order && !info.lossy && self.deterministic {
            return Err(Error::Config {
                key: "TPCOMM_ALGO",
                value: algo.to_string(),
                expected: "another algorithm (or auto) while TPCOMM_DETERMINISTIC=1: NCCL does not sum in a \
                           fixed rank order"
                    .into(),
            });
        }
        let s = req.shape;
        let span_problem = match info.span {
            Span::One if s.world != 1 => Some(format!("{algo} serves one rank, and there are {}", s.world)),
            Span::Node if s.nodes > 1 => Some(format!(
                "{algo} reduces among the ranks of one node and the ranks span {} nodes; use hier or nccl",
                s.nodes
            )),
            Span::Nodes if s.nodes == 1 => Some(format!("{algo} serves ranks on several nodes, and all are on one")),
            _ => None,
        };
        if let Some(detail) = span_problem {
            return Err(Error::usage(what(), detail));
        }
        let needs: &[(BackendKind, Group)] = match algo {
            Algo::Chunked => &[(BackendKind::Custom, Group::Node)],
            Algo::Hierarchical => &[(BackendKind::Custom, Group::Node), (BackendKind::Nccl, Group::Cross)],
            _ => match info.backend {
                Some(BackendKind::Nccl) => &[(BackendKind::Nccl, Group::World)],
                Some(BackendKind::Custom) => &[(BackendKind::Custom, Group::Node)],
                Some(BackendKind::Packet) => &[(BackendKind::Packet, Group::Node)],
                Some(BackendKind::Quick) => &[(BackendKind::Quick, Group::Node)],
                _ => &[],
            },
        };
        if let Some(&(kind, _)) = needs.iter().find(|(k, g)| !req.caps.has(*k, *g)) {
            return Err(Error::Unsupported { what: what(), reason: req.caps.why_missing(kind).to_string() });
        }
        if info.align > 1 && !req.aligned {
            return Err(misaligned("all_reduce", req));
        }
        let limit = match info.backend {
            Some(BackendKind::Packet) => Some((self.packet_buffer_bytes, "TPCOMM_PACKET_BUFFER_BYTES")),
            // The direct two-shot needs neither staging nor scratch where every peer reaches the
            // buffers: any size, as the unforced dispatch takes it above the limit.
            Some(BackendKind::Custom) if algo == Algo::TwoShot && req.peer_rows => None,
            Some(BackendKind::Custom) => Some((self.custom_max_bytes, "TPCOMM_CUSTOM_MAX_BYTES")),
            Some(BackendKind::Quick) => Some((self.quick_max_bytes, "TPCOMM_QUICK_MAX_BYTES")),
            _ => None,
        };
        if let Some((max, key)) = limit.filter(|(max, _)| req.bytes() > *max) {
            // The same verdict on every rank (the sizes match, or the call is a mismatch anyway).
            return Err(Error::usage(
                what(),
                format!("{} bytes exceed the {max} bytes {algo} serves (raise {key})", req.bytes()),
            ));
        }
        Ok(())
    }

    /// The steps of `algo` for `req`.
    fn plan_of(&self, algo: Algo, req: &Request, reason: &'static str) -> Result<Plan> {
        let len = req.len;
        let steps = match algo {
            Algo::Copy => vec![Step { op: Op::Copy, range: 0..len }],
            Algo::Chunked => self.node_steps(req, Src::Input),
            Algo::Hierarchical => {
                let s = req.shape;
                let shard =
                    crate::hierarchy::shard_ranges(len, s.min_ranks_per_node, s.ranks_per_node)[s.local_rank].clone();
                // 1. The node's partial sums (rank order within the node) into the output.
                let mut steps = self.node_steps(req, Src::Input);
                // 2. My shard summed across nodes, in place.
                if !shard.is_empty() {
                    let op = Op::Reduce { algo: Algo::Nccl, group: Group::Cross, src: Src::Output };
                    steps.push(Step { op, range: shard.clone() });
                }
                // 3. Gather: every element but my shard zeroed, then a node sum in place gives
                //    every element its owner's value (x + 0 = x; a -0 comes out +0).
                for range in [0..shard.start, shard.end..len] {
                    if !range.is_empty() {
                        steps.push(Step { op: Op::Zero, range });
                    }
                }
                steps.extend(self.node_steps(req, Src::Output));
                steps
            }
            _ => {
                let group = if algo == Algo::Nccl { Group::World } else { Group::Node };
                vec![Step { op: Op::Reduce { algo, group, src: Src::Input }, range: 0..len }]
            }
        };
        Ok(Plan { algo, steps, reason })
    }

    /// A node-wide reduction of the whole call with the IPC kernels, in chunks of at most
    /// `custom_max_bytes` cut at 16-byte multiples (every chunk keeps the alignment of the
    /// whole; every element is summed in rank order by its chunk's kernel, so the bits are those
    /// of one unchunked call).
    fn node_steps(&self, req: &Request, src: Src) -> Vec<Step> {
        let size = req.dtype.size();
        let align = crate::runtime::protocol::ALIGN;
        let chunk = (self.custom_max_bytes / align * align / size).max(1);
        let mut steps = Vec::with_capacity(req.len.div_ceil(chunk).max(1));
        let mut start = 0;
        loop {
            let end = (start + chunk).min(req.len);
            // Node steps reading the output (the hierarchy's second pass) are in place.
            let in_place = req.in_place || src == Src::Output;
            let algo = self.within_node((end - start) * size, req.caps, in_place, false).unwrap_or(Algo::TwoShot);
            steps.push(Step { op: Op::Reduce { algo, group: Group::Node, src }, range: start..end });
            start = end;
            if start >= req.len {
                return steps;
            }
        }
    }
}

fn misaligned(op: &'static str, req: &Request) -> Error {
    let align = crate::runtime::protocol::ALIGN;
    Error::invalid(
        op,
        format!(
            "input and output must be {align}-byte aligned for the IPC kernels, and NCCL, which takes any \
             alignment, is not available here (offset views by a multiple of {} elements)",
            align / req.dtype.size()
        ),
    )
}

impl fmt::Display for DispatchTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(algo) = self.forced {
            return writeln!(f, "# every call: {algo} (forced by TPCOMM_ALGO)");
        }
        writeln!(f, "# host memory:   bytes <= {:>10}: {}", self.host_oneshot_max_bytes, Algo::HostOneShot)?;
        writeln!(f, "# host memory:   bytes >  {:>10}: {}", self.host_oneshot_max_bytes, Algo::HostTwoShot)?;
        writeln!(f, "# device memory: one rank: {} (no kernel)", Algo::Copy)?;
        writeln!(f, "# device memory: bytes <= {:>10}: {}", self.packet_max_bytes, Algo::Lamport)?;
        let oneshot = |b: usize| if b == usize::MAX { "any".to_string() } else { b.to_string() };
        writeln!(
            f,
            "# device memory: bytes <= {:>10}: {} (out of place only)",
            oneshot(self.oneshot_max_bytes.min(self.custom_max_bytes)),
            Algo::OneShot,
        )?;
        writeln!(f, "# device memory: bytes <= {:>10}: {}", self.custom_max_bytes, Algo::TwoShot)?;
        writeln!(
            f,
            "# device memory: bytes <= {:>10}: allreduce + RMSNorm fused ({} with the norm up to {}{}), larger: split",
            self.fused_norm_max_bytes,
            Algo::OneShot,
            self.fused_oneshot_max_bytes(),
            match self.fused_oneshot_max_bytes() < self.fused_norm_max_bytes {
                true => format!(", {} above it where every peer reaches the buffers", Algo::TwoShot),
                false => String::new(),
            },
        )?;
        if let (Some(codec), false) = (self.quick, self.deterministic) {
            writeln!(
                f,
                "# device memory: {} <= bytes <= {}: {} (TPCOMM_QUICK; lossy), over the lines above",
                self.quick_min_bytes,
                self.quick_max_bytes,
                Algo::quick(codec)
            )?;
        }
        if self.deterministic {
            writeln!(
                f,
                "# device memory: bytes >  {:>10}: {} (deterministic: custom kernels in chunks of at most {} bytes)",
                self.custom_max_bytes,
                Algo::Chunked,
                self.custom_max_bytes
            )?;
            writeln!(f, "# device memory: several nodes or no P2P: unsupported (deterministic mode never uses NCCL)")
        } else {
            writeln!(
                f,
                "# device memory: bytes >  {:>10}: {} ({} where NCCL cannot run)",
                self.custom_max_bytes,
                Algo::Nccl,
                Algo::Chunked
            )?;
            writeln!(
                f,
                "# device memory: several nodes: bytes <= {:>10}: {} (IPC kernels in each node, NCCL between), \
                 larger: {}",
                self.custom_max_bytes,
                Algo::Hierarchical,
                Algo::Nccl
            )?;
            writeln!(f, "# device memory: no P2P or misaligned pointers: {} (any size)", Algo::Nccl)
        }
    }
}

/// The crossover of two algorithms from timings over increasing `sizes`: the limit `t`
/// (0 or one of `sizes`) such that using `first` up to `t` and `second` above costs the least
/// summed time relative to the faster of the two at each size. A single noisy size cannot cut
/// the range short, and every size counts alike whatever its absolute time.
pub(crate) fn crossover(sizes: &[usize], first: &[f64], second: &[f64]) -> usize {
    let rel = |i: usize, t: f64| t / first[i].min(second[i]).max(f64::MIN_POSITIVE);
    (0..=sizes.len())
        .map(|k| {
            let cost: f64 = (0..sizes.len()).map(|i| if i < k { rel(i, first[i]) } else { rel(i, second[i]) }).sum();
            (if k == 0 { 0 } else { sizes[k - 1] }, cost)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(limit, _)| limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(kinds: &[(BackendKind, Group)]) -> Caps {
        let mut c = Caps::none();
        for &(k, g) in kinds {
            c.add(k, g);
        }
        c.set_missing(BackendKind::Nccl, "ranks share a GPU");
        c.set_missing(BackendKind::Custom, "no P2P between the GPUs");
        c
    }

    fn all() -> Caps {
        caps(&[
            (BackendKind::Custom, Group::Node),
            (BackendKind::Packet, Group::Node),
            (BackendKind::Nccl, Group::World),
            (BackendKind::Nccl, Group::Cross),
        ])
    }

    fn ipc_only() -> Caps {
        caps(&[(BackendKind::Custom, Group::Node), (BackendKind::Packet, Group::Node)])
    }

    fn req(caps: &Caps, bytes: usize, shape: Shape) -> Request<'_> {
        Request {
            len: bytes / 2,
            dtype: DType::BF16,
            shape,
            caps,
            aligned: true,
            in_place: false,
            forced: None,
            peer_rows: false,
            norm: None,
        }
    }

    fn table(config: Config, world: usize) -> DispatchTable {
        DispatchTable::new(&Config { custom_max_bytes: 8 << 20, ..config }, world)
    }

    fn one(algo: Algo, group: Group, len: usize) -> Vec<Step> {
        vec![Step { op: Op::Reduce { algo, group, src: Src::Input }, range: 0..len }]
    }

    #[test]
    fn crossover_minimises_the_summed_relative_time() {
        let sizes = [4096, 8192, 16384, 32768];
        assert_eq!(crossover(&sizes, &[1.0, 2.0, 3.0, 9.0], &[1.5, 2.5, 2.95, 4.0]), 8192);
        // One noisy size where the second wins does not end the first's range early.
        assert_eq!(crossover(&sizes, &[1.0, 1.05, 1.0, 9.0], &[2.0, 1.0, 2.0, 4.0]), 16384);
        assert_eq!(crossover(&sizes, &[2.0, 2.0, 2.0, 2.0], &[1.0, 1.0, 1.0, 1.0]), 0);
        assert_eq!(crossover(&sizes, &[1.0; 4], &[2.0; 4]), 32768);
    }

    #[test]
    fn host_sizes_pick_by_threshold_and_forced_device_algorithms_are_refused() {
        let t = DispatchTable::new(&Config { host_oneshot_max_bytes: Some(1000), ..Config::default() }, 4);
        assert_eq!(t.host(250, DType::F32, None).unwrap(), Algo::HostOneShot);
        assert_eq!(t.host(251, DType::F32, None).unwrap(), Algo::HostTwoShot);
        assert_eq!(t.host(251, DType::F32, Some(Algo::HostOneShot)).unwrap(), Algo::HostOneShot);
        let err = t.host(8, DType::F32, Some(Algo::OneShot)).unwrap_err();
        assert!(matches!(err, Error::InvalidUsage { .. }) && err.to_string().contains("host_twoshot"), "{err}");
        assert_eq!(DispatchTable::new(&Config::default(), 2).host_oneshot_max_bytes, 64 << 10);
        assert_eq!(DispatchTable::new(&Config::default(), 8).host_oneshot_max_bytes, 1 << 10);
    }

    #[test]
    fn one_node_sizes_follow_the_world_size() {
        let c = all();
        for (world, packet, oneshot) in [(4, 128 << 10, 1 << 20), (8, 32 << 10, 128 << 10)] {
            let t = table(Config::default(), world);
            let s = Shape::one_node(world, 0);
            let algo = |bytes| t.device(&req(&c, bytes, s)).unwrap().algo;
            let in_place = |bytes| t.device(&Request { in_place: true, ..req(&c, bytes, s) }).unwrap().algo;
            assert_eq!(algo(0), Algo::Lamport);
            assert_eq!(algo(packet), Algo::Lamport);
            assert_eq!(algo(packet + 2), Algo::OneShot);
            assert_eq!(algo(oneshot), Algo::OneShot);
            assert_eq!(algo(oneshot + 2), Algo::TwoShot);
            assert_eq!(in_place(packet), Algo::Lamport, "packets are in place for free");
            assert_eq!(in_place(packet + 2), Algo::TwoShot, "one-shot in place would stage its input");
            assert_eq!(algo(8 << 20), Algo::TwoShot);
            assert_eq!(algo((8 << 20) + 2), Algo::Nccl);
        }
        // Two ranks: one-shot out of place up to the IPC limit, two-shot in place above packets.
        let t = table(Config::default(), 2);
        let s = Shape::one_node(2, 0);
        assert_eq!(t.device(&req(&c, 512 << 10, s)).unwrap().algo, Algo::Lamport);
        assert_eq!(t.device(&req(&c, 8 << 20, s)).unwrap().algo, Algo::OneShot);
        assert_eq!(t.device(&Request { in_place: true, ..req(&c, 512 << 10, s) }).unwrap().algo, Algo::Lamport);
        assert_eq!(t.device(&Request { in_place: true, ..req(&c, (512 << 10) + 2, s) }).unwrap().algo, Algo::TwoShot);
        let env = table(Config { oneshot_max_bytes: Some(1 << 20), ..Config::default() }, 8);
        assert_eq!(env.device(&req(&c, 1 << 20, Shape::one_node(8, 0))).unwrap().algo, Algo::OneShot);
        // The packet override is capped by the buffer the packet kernels have.
        let big = Config { packet_max_bytes: Some(4 << 20), packet_buffer_bytes: 1 << 20, ..Config::default() };
        assert_eq!(DispatchTable::new(&big, 2).packet_max_bytes, 1 << 20);
        // One rank copies, whatever the size.
        let t = table(Config::default(), 1);
        for bytes in [0, 4096, 64 << 20] {
            let p = t.device(&req(&c, bytes, Shape::one_node(1, 0))).unwrap();
            assert_eq!(p.steps, vec![Step { op: Op::Copy, range: 0..bytes / 2 }]);
        }
    }

    #[test]
    fn plans_are_steps_of_backend_algorithms() {
        let c = all();
        let t = table(Config::default(), 4);
        let s = Shape::one_node(4, 2);
        assert_eq!(t.device(&req(&c, 4096, s)).unwrap().steps, one(Algo::Lamport, Group::Node, 2048));
        assert_eq!(t.device(&req(&c, 16 << 20, s)).unwrap().steps, one(Algo::Nccl, Group::World, 8 << 20));
    }

    #[test]
    fn misaligned_pointers_and_missing_ipc_go_to_nccl_or_fail_clearly() {
        let c = all();
        let t = table(Config::default(), 4);
        let s = Shape::one_node(4, 0);
        let misaligned = Request { aligned: false, ..req(&c, 4096, s) };
        let p = t.device(&misaligned).unwrap();
        assert_eq!((p.algo, p.reason), (Algo::Nccl, "the pointers are not 16-byte aligned, as the IPC kernels need"));
        let ipc = ipc_only();
        let err = t.device(&Request { aligned: false, ..req(&ipc, 4096, s) }).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }) && err.to_string().contains("16-byte"), "{err}");
        let nccl = caps(&[(BackendKind::Nccl, Group::World)]);
        for bytes in [0, 16, 512 << 10, 64 << 20] {
            assert_eq!(t.device(&req(&nccl, bytes, s)).unwrap().algo, Algo::Nccl);
        }
        let err = t.device(&req(&Caps::none(), 64, s)).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }

    #[test]
    fn buffers_every_peer_reaches_take_one_two_shot_above_the_staging_size_where_nccl_does_not() {
        let s = Shape::one_node(4, 0);
        let big = (20 << 20) + 6;
        let reach = |caps, in_place| Request { peer_rows: true, in_place, ..req(caps, big, s) };
        let (ipc, every) = (ipc_only(), all());
        for in_place in [false, true] {
            for deterministic in [false, true] {
                let t = table(Config { deterministic, ..Config::default() }, 4);
                let p = t.device(&reach(&ipc, in_place)).unwrap();
                assert_eq!((p.algo, p.steps.len()), (Algo::TwoShot, 1), "in place {in_place}");
                // NCCL, where it serves, keeps the large messages; deterministic mode never uses it.
                let algo = t.device(&reach(&every, in_place)).unwrap().algo;
                assert_eq!(algo, if deterministic { Algo::TwoShot } else { Algo::Nccl });
            }
        }
        // Buffers the peers cannot reach still go in chunks through the staging buffers.
        let t = table(Config::default(), 4);
        assert_eq!(t.device(&req(&ipc, big, s)).unwrap().algo, Algo::Chunked);
        // Below the staging size nothing changes.
        let small = Request { peer_rows: true, ..req(&ipc, 1 << 20, s) };
        assert_eq!(t.device(&small).unwrap().algo, Algo::OneShot);
    }

    #[test]
    fn without_nccl_large_messages_go_chunked() {
        let c = ipc_only();
        let t = table(Config::default(), 4);
        let s = Shape::one_node(4, 0);
        assert_eq!(t.device(&req(&c, 1 << 20, s)).unwrap().algo, Algo::OneShot);
        let p = t.device(&req(&c, (20 << 20) + 6, s)).unwrap();
        assert_eq!(p.algo, Algo::Chunked);
        let chunk = 4 << 20; // 8 MiB of bf16
        let ranges: Vec<_> = p.steps.iter().map(|st| st.range.clone()).collect();
        assert_eq!(ranges, vec![0..chunk, chunk..2 * chunk, 2 * chunk..(10 << 20) + 3]);
        let algos: Vec<_> = p.steps.iter().map(|st| st.op).collect();
        let op = |algo| Op::Reduce { algo, group: Group::Node, src: Src::Input };
        assert_eq!(algos, vec![op(Algo::TwoShot), op(Algo::TwoShot), op(Algo::TwoShot)]);
        // A short last chunk is chosen as an unforced call of its size would be.
        let p = t.device(&req(&c, (8 << 20) + 100, s)).unwrap();
        assert_eq!(p.steps[1].op, op(Algo::Lamport));
        assert_eq!(p.steps[1].range, (4 << 20)..(4 << 20) + 50);
    }

    #[test]
    fn deterministic_mode_never_chooses_nccl() {
        let c = all();
        let t = table(Config { deterministic: true, ..Config::default() }, 4);
        let s = Shape::one_node(4, 0);
        assert_eq!(t.device(&req(&c, 8 << 20, s)).unwrap().algo, Algo::TwoShot);
        for bytes in [(8 << 20) + 2, 64 << 20] {
            assert_eq!(t.device(&req(&c, bytes, s)).unwrap().algo, Algo::Chunked, "{bytes}");
        }
        let err = t.device(&Request { aligned: false, ..req(&c, 64, s) }).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        let nodes = Shape { nodes: 2, ranks_per_node: 2, min_ranks_per_node: 2, ..s };
        let err = t.device(&req(&c, 64, nodes)).unwrap_err();
        assert!(err.to_string().contains("TPCOMM_DETERMINISTIC"), "{err}");
        let nccl = caps(&[(BackendKind::Nccl, Group::World)]);
        let err = t.device(&req(&nccl, 64, s)).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }) && err.to_string().contains("deterministic"), "{err}");
    }

    #[test]
    fn several_nodes_take_the_hierarchy_as_steps() {
        let c = all();
        let t = table(Config::default(), 4);
        // 4 ranks on 2 nodes, this rank local 1 of 2: it owns the second half.
        let s = Shape { world: 4, nodes: 2, local_rank: 1, ranks_per_node: 2, min_ranks_per_node: 2 };
        let p = t.device(&req(&c, 4000, s)).unwrap();
        assert_eq!(p.algo, Algo::Hierarchical);
        let node = |src| Op::Reduce { algo: Algo::Lamport, group: Group::Node, src };
        assert_eq!(
            p.steps,
            vec![
                Step { op: node(Src::Input), range: 0..2000 },
                Step { op: Op::Reduce { algo: Algo::Nccl, group: Group::Cross, src: Src::Output }, range: 1000..2000 },
                Step { op: Op::Zero, range: 0..1000 },
                Step { op: node(Src::Output), range: 0..2000 },
            ]
        );
        // Flat NCCL above the IPC limit; NCCL alone where the nodes have no IPC kernels.
        assert_eq!(t.device(&req(&c, (8 << 20) + 2, s)).unwrap().algo, Algo::Nccl);
        let nccl = caps(&[(BackendKind::Nccl, Group::World)]);
        assert_eq!(t.device(&req(&nccl, 64, s)).unwrap().algo, Algo::Nccl);
        // A local rank beyond the smallest node owns no shard: it zeroes everything.
        let uneven = Shape { world: 5, nodes: 2, local_rank: 2, ranks_per_node: 3, min_ranks_per_node: 2 };
        let p = t.device(&req(&c, 4000, uneven)).unwrap();
        assert!(p.steps.iter().all(|st| !matches!(st.op, Op::Reduce { group: Group::Cross, .. })));
        assert!(p.steps.contains(&Step { op: Op::Zero, range: 0..2000 }));
    }

    #[test]
    fn forced_algorithms_are_checked_against_the_call_on_every_rank() {
        let c = all();
        let s = Shape::one_node(4, 0);
        let forced = |algo, r: Request| table(Config::default(), 4).device(&Request { forced: Some(algo), ..r });
        // Copy with several ranks would return each rank's own input.
        let err = forced(Algo::Copy, req(&c, 64, s)).unwrap_err();
        assert!(matches!(err, Error::InvalidUsage { .. }) && err.to_string().contains("one rank"), "{err}");
        let err = forced(Algo::HostOneShot, req(&c, 64, s)).unwrap_err();
        assert!(matches!(err, Error::InvalidUsage { .. }), "{err}");
        let err = forced(Algo::Hierarchical, req(&c, 64, s)).unwrap_err();
        assert!(matches!(err, Error::InvalidUsage { .. }), "{err}");
        let nodes = Shape { nodes: 2, ranks_per_node: 2, min_ranks_per_node: 2, ..s };
        let err = forced(Algo::OneShot, req(&c, 64, nodes)).unwrap_err();
        assert!(matches!(err, Error::InvalidUsage { .. }) && err.to_string().contains("hier or nccl"), "{err}");
        // Sizes and alignment the kernels cannot take.
        let err = forced(Algo::Packet, req(&c, (1 << 20) + 16, s)).unwrap_err();
        assert!(matches!(err, Error::InvalidUsage { .. }) && err.to_string().contains("PACKET_BUFFER"), "{err}");
        let err = forced(Algo::TwoShot, req(&c, (8 << 20) + 16, s)).unwrap_err();
        assert!(err.to_string().contains("TPCOMM_CUSTOM_MAX_BYTES"), "{err}");
        let err = forced(Algo::OneShot, Request { aligned: false, ..req(&c, 64, s) }).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        // A backend that is not there, with its reason.
        let err = forced(Algo::Nccl, req(&ipc_only(), 64, s)).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }) && err.to_string().contains("share a GPU"), "{err}");
        // What can serve the call is served, unchunked, any size for NCCL.
        assert_eq!(forced(Algo::Nccl, req(&c, 1 << 30, s)).unwrap().steps, one(Algo::Nccl, Group::World, 1 << 29));
        assert_eq!(forced(Algo::Lamport, req(&c, 4096, s)).unwrap().steps, one(Algo::Lamport, Group::Node, 2048));
        assert_eq!(forced(Algo::Chunked, req(&c, 4096, s)).unwrap().algo, Algo::Chunked);
        let one_rank = table(Config::default(), 1)
            .device(&Request { forced: Some(Algo::Lamport), ..req(&c, 4096, Shape::one_node(1, 0)) });
        assert_eq!(one_rank.unwrap().algo, Algo::Lamport);
        // NCCL forced in deterministic mode (a Config built in code, past Config::validate).
        let det = table(Config { algo: Some(Algo::Nccl), deterministic: true, ..Config::default() }, 4);
        let err = det.device(&req(&c, 64, s)).unwrap_err();
        assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("TPCOMM_DETERMINISTIC"), "{err}");
    }

    #[test]
    fn quick_is_opt_in_sized_and_never_chosen_in_deterministic_mode() {
        let mut c = all();
        c.add(BackendKind::Quick, Group::Node);
        let s = Shape::one_node(4, 0);
        let int8 = Config { quick: Some(Codec::Int8), ..Config::default() };
        let t = table(int8.clone(), 4);
        let algo = |t: &DispatchTable, caps: &Caps, bytes| t.device(&req(caps, bytes, s)).unwrap().algo;
        // Off by default, even with the backend built.
        assert_eq!(algo(&table(Config::default(), 4), &c, 4 << 20), Algo::TwoShot);
        // On: from the codec's minimum to its maximum, exact algorithms elsewhere.
        assert_eq!(t.quick_min_bytes, 2 << 20);
        assert_eq!(algo(&t, &c, (2 << 20) - 2), Algo::TwoShot);
        assert_eq!(algo(&t, &c, 2 << 20), Algo::QuickInt8);
        assert_eq!(algo(&t, &c, 64 << 20), Algo::QuickInt8);
        assert_eq!(algo(&t, &c, (64 << 20) + 2), Algo::Nccl);
        assert_eq!(DispatchTable::new(&int8, 2).quick_min_bytes, 1 << 20);
        assert_eq!(DispatchTable::new(&int8, 8).quick_min_bytes, 4 << 20);
        let low = table(Config { quick_min_bytes: Some(4096), ..int8.clone() }, 4);
        assert_eq!(algo(&low, &c, 4096), Algo::QuickInt8);
        // Not where the backend is missing, nor in deterministic mode, nor for doubles.
        assert_eq!(algo(&t, &all(), 4 << 20), Algo::TwoShot);
        let det = table(Config { deterministic: true, ..int8.clone() }, 4);
        assert_eq!(algo(&det, &c, 4 << 20), Algo::TwoShot);
        let doubles = Request { len: (4 << 20) / 8, dtype: DType::F64, ..req(&c, 0, s) };
        assert_ne!(t.device(&doubles).unwrap().algo, Algo::QuickInt8);
        // Forced: another codec than the configured one, in deterministic mode too; refused over
        // its buffers or without the backend, with the reason.
        let forced = |t: &DispatchTable, caps: &Caps, algo, bytes| {
            t.device(&Request { forced: Some(algo), ..req(caps, bytes, s) })
        };
        assert_eq!(forced(&t, &c, Algo::QuickInt4, 64).unwrap().steps, one(Algo::QuickInt4, Group::Node, 32));
        assert_eq!(forced(&det, &c, Algo::QuickFp8, 64).unwrap().algo, Algo::QuickFp8);
        let err = forced(&t, &c, Algo::QuickInt6, (64 << 20) + 16).unwrap_err();
        assert!(err.to_string().contains("TPCOMM_QUICK_MAX_BYTES"), "{err}");
        let err = forced(&t, &all(), Algo::QuickInt6, 64).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let text = t.to_string();
        assert!(text.contains("quick_int8") && text.contains("lossy"), "{text}");
        assert!(!det.to_string().contains("quick"), "{}", det.to_string());
    }

    /// A call of `all_reduce_add_rms_norm` with rows of 4096 elements.
    fn norm_req(caps: &Caps, bytes: usize, shape: Shape, fusion: Fusion) -> Request<'_> {
        Request { norm: Some(NormRequest { hidden: 4096, fusion }), ..req(caps, bytes, shape) }
    }

    /// The fused plan of a call of `len` elements: one fused one-shot over the whole call.
    fn assert_fused(plan: &Plan, len: usize, what: &str) {
        let op = Op::ReduceAddRmsNorm { algo: Algo::OneShot, group: Group::Node };
        assert!(plan.fused(), "{what}: {plan:?}");
        assert_eq!(plan.algo, Algo::OneShot, "{what}");
        assert_eq!(plan.steps, vec![Step { op, range: 0..len }], "{what}");
    }

    /// The split plan of `r` (a norm request): the ordinary plan of the same call, then the norm.
    fn assert_split(t: &DispatchTable, r: &Request, what: &str) {
        let plan = t.device(r).unwrap_or_else(|e| panic!("{what}: {e}"));
        let ordinary = t.device(&Request { norm: None, ..*r }).unwrap_or_else(|e| panic!("{what}, no norm: {e}"));
        let mut steps = ordinary.steps.clone();
        steps.push(Step { op: Op::AddRmsNorm, range: 0..r.len });
        assert!(!plan.fused(), "{what}: {plan:?}");
        assert_eq!(plan.algo, ordinary.algo, "{what}");
        assert_eq!(plan.steps, steps, "{what}");
    }

    /// `Fusion::Fused` refused for `r`, with a reason containing `why`.
    fn assert_refused(t: &DispatchTable, r: &Request, why: &str, what: &str) {
        let err = t.device(&Request { norm: Some(NormRequest { hidden: 4096, fusion: Fusion::Fused }), ..*r });
        match err {
            Err(e @ Error::InvalidUsage { .. }) => assert!(e.to_string().contains(why), "{what}: {e}"),
            other => panic!("{what}: Fusion::Fused gave {other:?}, not InvalidUsage"),
        }
    }

    #[test]
    fn auto_fuses_one_node_calls_up_to_the_fused_limit_and_splits_above() {
        let c = all();
        for world in [2, 4, 8] {
            let t = table(Config::default(), world);
            // Buffers no peer reaches: the fused one-shot up to its limit.
            let limit = fused_oneshot_max_bytes(world);
            assert_eq!(t.fused_norm_max_bytes(), fused_norm_max_bytes(world));
            for local_rank in [0, world - 1] {
                let s = Shape::one_node(world, local_rank);
                for in_place in [false, true] {
                    let r = |bytes| Request { in_place, ..norm_req(&c, bytes, s, Fusion::Auto) };
                    for bytes in [0, 16, 4096, packet_max_bytes(world), limit - 16, limit] {
                        let what = format!("world {world} rank {local_rank} in place {in_place}: {bytes} bytes");
                        assert_fused(&t.device(&r(bytes)).unwrap(), bytes / 2, &what);
                    }
                    // Above: one-shot, two-shot, NCCL (over the IPC limit), then the norm.
                    for bytes in [limit + 16, 2 * limit, 8 << 20, (8 << 20) + 16, 64 << 20] {
                        let what = format!("world {world} rank {local_rank} in place {in_place}: {bytes} bytes");
                        assert_split(&t, &r(bytes), &what);
                    }
                }
            }
            // The ordinary plans the split path extends: what an allreduce of that size gets.
            let s = Shape::one_node(world, 0);
            let split = t.device(&norm_req(&c, 64 << 20, s, Fusion::Auto)).unwrap();
            assert_eq!(split.algo, Algo::Nccl);
            let mut want = one(Algo::Nccl, Group::World, 32 << 20);
            want.push(Step { op: Op::AddRmsNorm, range: 0..32 << 20 });
            assert_eq!(split.steps, want);
            let above = norm_req(&c, limit + 16, s, Fusion::Auto);
            let plain = t.device(&Request { norm: None, ..above }).unwrap();
            assert_eq!(t.device(&above).unwrap().algo, plain.algo, "world {world}");
            // Forced fused, the limit does not apply (the IPC limit does).
            assert_fused(&t.device(&norm_req(&c, 8 << 20, s, Fusion::Fused)).unwrap(), 4 << 20, "fused at 8 MiB");
            // Buffers every peer reaches: the fused one-shot up to its limit, the fused two-shot
            // above it through the fused limit (at 8 ranks; at 2 and 4 the one-shot's limit is
            // the whole limit).
            let max = fused_norm_max_bytes(world);
            let reach = |bytes| Request { peer_rows: true, ..norm_req(&c, bytes, s, Fusion::Auto) };
            let two = Op::ReduceAddRmsNorm { algo: Algo::TwoShot, group: Group::Node };
            for bytes in [16, 4096, limit, limit + 16, max - 16, max, max + 16] {
                let what = format!("world {world}, reachable: {bytes} bytes");
                if bytes > max {
                    assert_split(&t, &reach(bytes), &what);
                } else if bytes <= limit {
                    assert_fused(&t.device(&reach(bytes)).unwrap(), bytes / 2, &what);
                } else {
                    let p = t.device(&reach(bytes)).unwrap();
                    assert_eq!((p.algo, p.steps), (Algo::TwoShot, vec![Step { op: two, range: 0..bytes / 2 }]));
                }
            }
            assert_eq!(world == 8, limit < max, "world {world}: the one-shot's limit is the whole limit at 2-4 ranks");
        }
        // Other element types: the limit is in bytes.
        let t = table(Config::default(), 4);
        let s = Shape::one_node(4, 0);
        let f32s = |bytes: usize| Request { len: bytes / 4, dtype: DType::F32, ..norm_req(&c, 0, s, Fusion::Auto) };
        let lim = fused_oneshot_max_bytes(4);
        assert_fused(&t.device(&f32s(lim)).unwrap(), lim / 4, "f32 at the limit");
        assert_split(&t, &f32s(lim + 16), "f32 above the limit");
    }

    #[test]
    fn split_is_always_split() {
        let c = all();
        let nodes = Shape { world: 4, nodes: 2, local_rank: 1, ranks_per_node: 2, min_ranks_per_node: 2 };
        for (world, s) in [
            (1, Shape::one_node(1, 0)),
            (2, Shape::one_node(2, 1)),
            (4, Shape::one_node(4, 0)),
            (8, Shape::one_node(8, 7)),
            (4, nodes),
        ] {
            let t = table(Config::default(), world);
            for bytes in [0, 16, 4096, 256 << 10, 1 << 20, 8 << 20, 64 << 20] {
                for in_place in [false, true] {
                    let r = Request { in_place, ..norm_req(&c, bytes, s, Fusion::Split) };
                    assert_split(&t, &r, &format!("{s:?} {bytes} bytes in place {in_place}"));
                }
            }
        }
        // The steps themselves: one rank copies, the nodes take the hierarchy, then the norm.
        let p = table(Config::default(), 1).device(&norm_req(&c, 4096, Shape::one_node(1, 0), Fusion::Split)).unwrap();
        let norm = Step { op: Op::AddRmsNorm, range: 0..2048 };
        assert_eq!(p.steps, vec![Step { op: Op::Copy, range: 0..2048 }, norm.clone()]);
        let p = table(Config::default(), 4).device(&norm_req(&c, 4096, nodes, Fusion::Split)).unwrap();
        assert_eq!(p.algo, Algo::Hierarchical);
        assert_eq!(p.steps.last(), Some(&norm));
        assert_eq!(p.steps.len(), 5, "{p:?}");
        let p = table(Config::default(), 4).device(&norm_req(&c, 4096, Shape::one_node(4, 0), Fusion::Split)).unwrap();
        assert_eq!(p.steps, vec![one(Algo::Lamport, Group::Node, 2048)[0].clone(), norm]);
    }

    #[test]
    fn long_rows_in_place_take_the_fused_two_shot_at_5_to_8_ranks() {
        let c = all();
        let two = |p: &Plan| p.fused() && p.algo == Algo::TwoShot;
        for world in [2, 4, 5, 8] {
            let t = table(Config::default(), world);
            let s = Shape::one_node(world, 0);
            for (hidden, bytes) in [(8192, 16 << 10), (8192, 256 << 10), (4096, 16 << 10), (16384, 64 << 10)] {
                let r = |in_place, peer_rows| Request {
                    in_place,
                    peer_rows,
                    norm: Some(NormRequest { hidden, fusion: Fusion::Auto }),
                    ..req(&c, bytes, s)
                };
                let long = hidden * 2 >= 16 << 10 && world >= 5;
                let what = format!("world {world}, hidden {hidden}, {bytes} bytes");
                assert_eq!(two(&t.device(&r(true, true)).unwrap()), long, "{what}, in place, reachable");
                // Out of place, or buffers no peer reaches: the byte rule's one-shot.
                for (in_place, peer_rows) in [(false, true), (true, false), (false, false)] {
                    let p = t.device(&r(in_place, peer_rows)).unwrap();
                    assert_fused(&p, bytes / 2, &format!("{what}, in place {in_place}, reachable {peer_rows}"));
                }
            }
        }
    }

    #[test]
    fn forced_two_shot_fuses_only_where_every_peer_reaches_the_buffers() {
        let c = all();
        let s = Shape::one_node(4, 0);
        let t = table(Config::default(), 4);
        let two = Op::ReduceAddRmsNorm { algo: Algo::TwoShot, group: Group::Node };
        for (bytes, auto_fuses) in [(4096, true), (t.fused_norm_max_bytes() + 16, false), (4 << 20, false)] {
            let len = bytes / 2;
            for env in [false, true] {
                let (t, forced) = if env {
                    (table(Config { algo: Some(Algo::TwoShot), ..Config::default() }, 4), None)
                } else {
                    (table(Config::default(), 4), Some(Algo::TwoShot))
                };
                let what = format!("{bytes} bytes, two-shot forced (TPCOMM_ALGO: {env})");
                // Buffers every peer reaches: the fused two-shot at any size when asked for,
                // and under Auto up to the fused limit.
                let reach = Request { forced, peer_rows: true, ..norm_req(&c, bytes, s, Fusion::Fused) };
                let p = t.device(&reach).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!((p.algo, p.steps.clone()), (Algo::TwoShot, vec![Step { op: two, range: 0..len }]));
                let auto = Request { norm: Some(NormRequest { hidden: 4096, fusion: Fusion::Auto }), ..reach };
                if auto_fuses {
                    assert_eq!(t.device(&auto).unwrap().steps, p.steps, "{what}, Auto");
                } else {
                    assert_split(&t, &auto, &format!("{what}, Auto"));
                }
                // Elsewhere refused, saying why; Auto splits.
                let r = Request { forced, ..norm_req(&c, bytes, s, Fusion::Auto) };
                assert_split(&t, &r, &format!("{what}, unreachable"));
                assert_refused(&t, &r, "every peer reaches", &format!("{what}, unreachable"));
            }
        }
        // Beyond the staging size too, where every peer reaches the buffers (forced plain
        // two-shot likewise); elsewhere the limit stands.
        let big = Request { forced: Some(Algo::TwoShot), peer_rows: true, ..norm_req(&c, 64 << 20, s, Fusion::Fused) };
        let p = t.device(&big).unwrap();
        assert_eq!((p.algo, p.steps), (Algo::TwoShot, vec![Step { op: two, range: 0..32 << 20 }]));
        let plain = t.device(&Request { norm: None, ..big }).unwrap();
        assert_eq!(plain.steps, one(Algo::TwoShot, Group::Node, 32 << 20));
        let staged = Request { peer_rows: false, norm: None, ..big };
        assert!(matches!(t.device(&staged), Err(Error::InvalidUsage { .. })), "forced two-shot over the limit, staged");
        // Every layout refusal comes first.
        let reach = Request { forced: Some(Algo::TwoShot), peer_rows: true, ..norm_req(&c, 4096, s, Fusion::Auto) };
        let nodes = Shape { world: 4, nodes: 2, local_rank: 0, ranks_per_node: 2, min_ranks_per_node: 2 };
        assert_refused(&t, &Request { shape: nodes, ..reach }, "2 nodes", "two nodes");
        let misaligned = Request { aligned: false, ..reach };
        assert!(matches!(t.device(&misaligned), Err(Error::InvalidArgument { .. })), "misaligned");
    }

    #[test]
    fn fused_where_the_kernel_cannot_serve_is_refused_and_auto_splits_there() {
        let c = all();
        let s = Shape::one_node(4, 0);
        let t = table(Config::default(), 4);
        // A small call, well under every limit, in each layout the fused kernel cannot take.
        let one_rank = table(Config::default(), 1);
        let r = norm_req(&c, 4096, Shape::one_node(1, 0), Fusion::Auto);
        assert_split(&one_rank, &r, "one rank");
        assert_refused(&one_rank, &r, "one rank", "one rank");
        let nodes = Shape { world: 4, nodes: 2, local_rank: 0, ranks_per_node: 2, min_ranks_per_node: 2 };
        let r = norm_req(&c, 4096, nodes, Fusion::Auto);
        assert_split(&t, &r, "two nodes");
        assert_eq!(t.device(&r).unwrap().algo, Algo::Hierarchical);
        assert_refused(&t, &r, "2 nodes", "two nodes");
        let nccl = caps(&[(BackendKind::Nccl, Group::World)]);
        let r = norm_req(&nccl, 4096, s, Fusion::Auto);
        assert_split(&t, &r, "no custom kernels");
        assert_eq!(t.device(&r).unwrap().algo, Algo::Nccl);
        assert_refused(&t, &r, "no P2P between the GPUs", "no custom kernels");
        let r = Request { aligned: false, ..norm_req(&c, 4096, s, Fusion::Auto) };
        assert_split(&t, &r, "misaligned");
        assert_eq!(t.device(&r).unwrap().algo, Algo::Nccl);
        assert_refused(&t, &r, "16-byte aligned", "misaligned");
        // Misaligned without NCCL: the allreduce itself is refused, fused or not.
        let ipc = ipc_only();
        let r = Request { aligned: false, ..norm_req(&ipc, 4096, s, Fusion::Auto) };
        assert!(matches!(t.device(&r), Err(Error::InvalidArgument { .. })));
        // Over the IPC limit (a small one, so the fused limit is not what splits it).
        let small = DispatchTable::new(&Config { custom_max_bytes: 8192, ..Config::default() }, 4);
        assert_fused(&small.device(&norm_req(&c, 8192, s, Fusion::Auto)).unwrap(), 4096, "at the IPC limit");
        assert_fused(&small.device(&norm_req(&c, 8192, s, Fusion::Fused)).unwrap(), 4096, "forced at the IPC limit");
        for bytes in [8192 + 16, 64 << 10] {
            let r = norm_req(&c, bytes, s, Fusion::Auto);
            assert_split(&small, &r, &format!("{bytes} bytes over the IPC limit"));
            assert_refused(&small, &r, "TPCOMM_CUSTOM_MAX_BYTES", "over the IPC limit");
        }
        // Without NCCL, above the packets' limit: chunks of the IPC limit, then the norm.
        let no_nccl = small.device(&norm_req(&ipc, 256 << 10, s, Fusion::Auto)).unwrap();
        assert_eq!((no_nccl.algo, no_nccl.steps.len()), (Algo::Chunked, 33), "32 chunks, then the norm");
        assert_eq!(t.device(&norm_req(&c, (8 << 20) + 16, s, Fusion::Auto)).unwrap().algo, Algo::Nccl);
        assert_refused(&t, &norm_req(&c, (8 << 20) + 16, s, Fusion::Auto), "TPCOMM_CUSTOM_MAX_BYTES", "over 8 MiB");
        // The allreduce forced (per call or by TPCOMM_ALGO) to anything but one-shot or two-shot.
        for algo in [Algo::Packet, Algo::Lamport, Algo::PacketTwoPhase, Algo::Chunked, Algo::Nccl] {
            let r = Request { forced: Some(algo), ..norm_req(&c, 4096, s, Fusion::Auto) };
            assert_split(&t, &r, &format!("forced {algo}"));
            assert_eq!(t.device(&r).unwrap().algo, algo);
            assert_refused(&t, &r, &format!("forced to {algo}"), &format!("forced {algo}"));
            let env = table(Config { algo: Some(algo), ..Config::default() }, 4);
            let r = norm_req(&c, 4096, s, Fusion::Auto);
            assert_split(&env, &r, &format!("TPCOMM_ALGO={algo}"));
            assert_refused(&env, &r, &format!("forced to {algo}"), &format!("TPCOMM_ALGO={algo}"));
        }
        // A forced algorithm that cannot serve the call stays the allreduce's error.
        let r = Request { forced: Some(Algo::Copy), ..norm_req(&c, 4096, s, Fusion::Split) };
        assert!(matches!(t.device(&r), Err(Error::InvalidUsage { .. })));
        // Forced one-shot is the fused kernel's own algorithm: Auto still fuses up to the limit.
        for env in [false, true] {
            let (t, forced) = if env {
                (table(Config { algo: Some(Algo::OneShot), ..Config::default() }, 4), None)
            } else {
                (table(Config::default(), 4), Some(Algo::OneShot))
            };
            let r = |bytes, fusion| Request { forced, ..norm_req(&c, bytes, s, fusion) };
            assert_fused(&t.device(&r(4096, Fusion::Auto)).unwrap(), 2048, "forced one-shot");
            let lim = fused_oneshot_max_bytes(4);
            assert_fused(&t.device(&r(lim, Fusion::Auto)).unwrap(), lim / 2, "forced one-shot at the limit");
            let above = r(lim + 16, Fusion::Auto);
            assert_split(&t, &above, "forced one-shot above the limit");
            assert_eq!(t.device(&above).unwrap().algo, Algo::OneShot);
            assert_fused(&t.device(&r(lim + 16, Fusion::Fused)).unwrap(), lim / 2 + 8, "forced fused");
            assert_split(&t, &r(4096, Fusion::Split), "forced one-shot, split");
        }
        // TPCOMM_QUICK where it serves the size (4 KiB up): the codec's plan, then the norm.
        let mut q = all();
        q.add(BackendKind::Quick, Group::Node);
        let int8 = Config { quick: Some(Codec::Int8), quick_min_bytes: Some(4096), ..Config::default() };
        let quick = table(int8.clone(), 4);
        let r = norm_req(&q, 4096, s, Fusion::Auto);
        assert_split(&quick, &r, "quick");
        assert_eq!(quick.device(&r).unwrap().algo, Algo::QuickInt8);
        assert_refused(&quick, &r, "TPCOMM_QUICK", "quick");
        assert_fused(
            &quick.device(&norm_req(&q, 4096 - 16, s, Fusion::Auto)).unwrap(),
            2048 - 8,
            "under quick's range",
        );
        let r = Request { forced: Some(Algo::OneShot), ..norm_req(&q, 4096, s, Fusion::Auto) };
        assert_fused(&quick.device(&r).unwrap(), 2048, "quick configured, one-shot forced");
        let det_quick = table(Config { deterministic: true, ..int8 }, 4);
        assert_fused(
            &det_quick.device(&norm_req(&q, 4096, s, Fusion::Auto)).unwrap(),
            2048,
            "quick off when deterministic",
        );
    }

    #[test]
    fn deterministic_mode_may_fuse() {
        let c = all();
        let s = Shape::one_node(4, 0);
        let t = table(Config { deterministic: true, ..Config::default() }, 4);
        let lim = fused_oneshot_max_bytes(4);
        for bytes in [16, 4096, lim] {
            assert_fused(&t.device(&norm_req(&c, bytes, s, Fusion::Auto)).unwrap(), bytes / 2, "deterministic");
        }
        let above = norm_req(&c, lim + 16, s, Fusion::Auto);
        assert_split(&t, &above, "deterministic, above the fused limit");
        assert_eq!(t.device(&above).unwrap().algo, Algo::TwoShot);
        let huge = norm_req(&c, 64 << 20, s, Fusion::Auto);
        assert_split(&t, &huge, "deterministic, over the IPC limit");
        assert_eq!(t.device(&huge).unwrap().algo, Algo::Chunked, "never NCCL");
        assert_refused(&t, &huge, "TPCOMM_CUSTOM_MAX_BYTES", "deterministic, over the IPC limit");
        assert_fused(&t.device(&norm_req(&c, 8 << 20, s, Fusion::Fused)).unwrap(), 4 << 20, "deterministic, forced");
    }

    #[test]
    fn a_zero_fused_limit_makes_auto_split() {
        let c = all();
        for world in [2, 4, 8] {
            let t = table(Config { fused_norm_max_bytes: Some(0), ..Config::default() }, world);
            assert_eq!(t.fused_norm_max_bytes(), 0);
            let s = Shape::one_node(world, 0);
            for bytes in [16, 4096, 64 << 10, 1 << 20] {
                for (in_place, peer_rows) in [(false, false), (true, false), (false, true), (true, true)] {
                    let r = Request { in_place, peer_rows, ..norm_req(&c, bytes, s, Fusion::Auto) };
                    let what =
                        format!("world {world}, limit 0: {bytes} bytes in place {in_place} reachable {peer_rows}");
                    assert_split(&t, &r, &what);
                }
            }
            // The limit is Auto's: the kernel can still be asked for.
            assert_fused(&t.device(&norm_req(&c, 4096, s, Fusion::Fused)).unwrap(), 2048, "limit 0, forced");
        }
        // Any other value moves the limit.
        let t = table(Config { fused_norm_max_bytes: Some(4096), ..Config::default() }, 2);
        let s = Shape::one_node(2, 0);
        assert_fused(&t.device(&norm_req(&c, 4096, s, Fusion::Auto)).unwrap(), 2048, "limit 4096");
        assert_split(&t, &norm_req(&c, 4096 + 16, s, Fusion::Auto), "over a limit of 4096");
    }

    #[test]
    fn the_printed_table_names_the_nccl_and_deterministic_rows() {
        let text = table(Config::default(), 4).to_string();
        assert!(text.contains("nccl") && text.contains("no P2P or misaligned pointers: nccl"), "{text}");
        assert!(text.contains("hier"), "{text}");
        let text = table(Config { deterministic: true, ..Config::default() }, 4).to_string();
        assert!(text.contains("chunked") && text.contains("unsupported") && !text.contains(": nccl"), "{text}");
    }
}
