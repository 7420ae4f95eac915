//! Quick allreduce: a two-shot over CUDA IPC whose traffic is quantized
//! (`kernels/quick_allreduce.cu`; the codecs and their error bounds are in [`crate::quant`]).
//!
//! The seed's interface (QuickReduce in SGLang and vLLM), mapped:
//!
//! | seed | here |
//! |---|---|
//! | `init_custom_qr(rank, world_size, qr_max_size)` | [`QuickAllreduce::new`] (`qr_max_size` = [`QuickOptions::max_bytes`], `TPCOMM_QUICK_MAX_BYTES`) |
//! | `qr_get_handle(fa)` + `qr_open_handles(fa, handles)` | inside `new` (the inboxes' IPC handles are exchanged and opened there) |
//! | `qr_all_reduce(fa, inp, out, quant_level, cast_bf2half)` | `enqueue` with `Algo::Quick*` (`quant_level` = the codec; no `cast_bf2half`: bf16 is decoded and summed in fp32, never cast to fp16) |
//! | `qr_max_size()` | [`QuickOptions::max_bytes`] |
//! | `qr_destroy(fa)` | `Drop` |
//!
//! ## Memory every rank shares (CUDA IPC)
//! - **signal** ([`protocol::signal_bytes`] for [`protocol::QUICK_MAX_BLOCKS`]): the barrier
//!   mailboxes of `kernels/barrier.cuh`.
//! - **inbox** ([`inbox_bytes`]): stage 1, one slot per source rank for the encoded
//!   contributions to this rank's shard; stage 2, one slot per owner for the encoded reduced
//!   shards. Every call lays its slots out from its own length, so calls of any size may
//!   follow each other and graphs need no registration: a kernel reads only the caller's input,
//!   writes only the caller's output and the peers' inboxes, whose addresses never change.
//!
//! Preconditions (as for every collective): all ranks make the same calls in the same order with
//! the same length, dtype and codec (another call is [`Error::Mismatch`] through the barriers'
//! call tags), and calls on one instance are serialised.

use super::custom::FaultTarget;
use super::peer_group::{check_world, export_all, kernel_error, share, KernelWords};
use super::{Call, DeviceBackend};
use crate::algo::Algo;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::{agree, barrier};
use crate::quant::{Codec, GROUP};
use crate::runtime::ipc::{IpcBuffer, PeerMappings};
use crate::runtime::{kernels, protocol, Context, Function, HostWord};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Block limit per launch, before the shared-device cap: the signal area's limit. The codecs
/// cost arithmetic per element, so quick takes every block the GPU can hold beside the peers'.
const DEFAULT_MAX_BLOCKS: usize = protocol::QUICK_MAX_BLOCKS;

/// Settings of a [`QuickAllreduce`].
#[derive(Debug, Clone)]
pub(crate) struct QuickOptions {
    /// Largest message (bytes per rank); sizes the inboxes (`TPCOMM_QUICK_MAX_BYTES`).
    pub max_bytes: usize,
    /// Spin limit of every barrier, and of every set-up exchange.
    pub timeout: Duration,
    /// Ranks whose kernels share this rank's GPU; caps the grid so all their blocks fit at once.
    pub ranks_per_device: usize,
    /// Kernel cache directory (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
    pub fault: FaultTarget,
    /// Launch with programmatic dependent launch (`TPCOMM_PDL`).
    pub pdl: bool,
}

/// Bytes of one slot holding `groups` encoded groups of `codec` (the kernel's `slot_bytes`):
/// low words, high parts and scales, each in its own region, rounded up to 16.
pub(crate) fn slot_bytes(codec: Codec, groups: usize) -> usize {
    (groups * codec.wire_bytes_per_group()).div_ceil(16) * 16
}

/// Bytes of one rank's inbox for messages up to `max_bytes` of 16-bit data (the most groups)
/// among `world` ranks, in the widest codec: two stages of `world` slots.
pub(crate) fn inbox_bytes(world: usize, max_bytes: usize) -> usize {
    let groups = (max_bytes / 2).div_ceil(GROUP);
    let widest = Codec::ALL.into_iter().map(|c| slot_bytes(c, groups.div_ceil(world))).max().unwrap_or(0);
    2 * world * widest
}

/// Blocks for a call of `len` elements among `world` ranks: one quad of threads per group of
/// the largest shard, within `max_blocks`.
fn grid_blocks(len: usize, world: usize, max_blocks: usize) -> usize {
    let per_shard = len.div_ceil(GROUP).div_ceil(world);
    (per_shard * 4).div_ceil(protocol::THREADS).clamp(1, max_blocks.max(1))
}

/// One rank's side of the quick allreduce.
pub(crate) struct QuickAllreduce {
    rank: usize,
    world: usize,
    funcs: HashMap<(Codec, DType), Function>,
    max_blocks: usize,
    max_bytes: usize,
    timeout: Duration,
    sigs: [u64; protocol::MAX_RANKS],
    inboxes: [u64; protocol::MAX_RANKS],
    err: HostWord,
    fault: FaultTarget,
    pdl: bool,
    // Dropped before our own buffers: peers' mappings close first.
    _peers: PeerMappings,
    _signal: IpcBuffer,
    _inbox: IpcBuffer,
}

/// The fallible part of [`QuickAllreduce::new`] before any exchange.
struct Prepared {
    funcs: HashMap<(Codec, DType), Function>,
    max_blocks: usize,
    signal: IpcBuffer,
    inbox: IpcBuffer,
}

impl QuickAllreduce {
    /// Allocate this rank's signal area and inbox, exchange their IPC handles with the other
    /// ranks of `comm` (all on this node), compile or load the kernels, and wait (bounded) until
    /// every rank has zeroed its signal area.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for too many ranks, a GPU older than sm_80 or a shared device that
    /// cannot hold every rank's blocks at once; [`Error::Cuda`] / [`Error::Compile`] from
    /// allocation, IPC or compilation. An error on one rank makes every rank return an error.
    pub(crate) fn new(comm: &SimpleCommunicator, ctx: &Arc<Context>, opts: &QuickOptions) -> Result<Self> {
        const STEP: &str = "quick allreduce set-up";
        let comm = crate::exchange::Comm::new(comm.duplicate());
        let world = comm.size() as usize;
        let rank = comm.rank() as usize;
        check_world(world, "quick allreduce")?;
        let p = agree(&*comm, Self::prepare(ctx, world, opts), opts.timeout, STEP)?;
        let local = [p.signal.ptr(), p.inbox.ptr()];
        let mut peers = PeerMappings::new(ctx);
        let shared = share(&*comm, opts.timeout, &local, export_all(ctx, &local), &mut peers, STEP)?;
        // Every signal area is zero (prepare() synchronised) before any rank launches a kernel.
        barrier(&*comm, opts.timeout, STEP)?;
        Ok(QuickAllreduce {
            rank,
            world,
            funcs: p.funcs,
            max_blocks: p.max_blocks,
            max_bytes: opts.max_bytes,
            timeout: opts.timeout,
            sigs: shared.addrs[0],
            inboxes: shared.addrs[1],
            err: HostWord::new()?,
            fault: opts.fault,
            pdl: opts.pdl,
            _peers: peers,
            _signal: p.signal,
            _inbox: p.inbox,
        })
    }

    fn prepare(ctx: &Arc<Context>, world: usize, opts: &QuickOptions) -> Result<Prepared> {
        // Entry points are named after the algorithms (`quick_int8_bf16`).
        let (funcs, _) = kernels::QUICK.load(
            ctx,
            world,
            opts.cache_dir.clone(),
            &Codec::ALL,
            |c| Algo::quick(c).as_str(),
            "the quick allreduce",
        )?;
        let cap = crate::runtime::co_resident_blocks(
            ctx,
            funcs.values(),
            protocol::THREADS,
            opts.ranks_per_device,
            "quick allreduce",
        )?;
        let max_blocks = DEFAULT_MAX_BLOCKS.min(cap);
        let signal = IpcBuffer::alloc_signal(ctx, protocol::signal_bytes(protocol::QUICK_MAX_BLOCKS))?;
        signal.zero()?;
        let inbox = IpcBuffer::alloc_signal(ctx, inbox_bytes(world, opts.max_bytes))?;
        Ok(Prepared { funcs, max_blocks, signal, inbox })
    }

    /// Most blocks of one launch (after the shared-device cap).
    pub(crate) fn max_blocks(&self) -> usize {
        self.max_blocks
    }
}

/// How the quick kernels' errors read.
const WORDS: KernelWords = KernelWords {
    op: "quick all_reduce",
    family: "quick allreduce",
    wait: |id| match id {
        protocol::BARRIER_START => "quick allreduce: start barrier",
        protocol::BARRIER_MID => "quick allreduce: waiting for the peers' encoded shards",
        _ => "quick allreduce: waiting for the owners' reduced shards",
    },
};

impl DeviceBackend for QuickAllreduce {
    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()> {
        const OP: &str = "quick all_reduce";
        let codec =
            algo.codec().ok_or_else(|| Error::Internal(format!("the quick backend was asked to run {algo}")))?;
        let stream = call.stream.device()?;
        let func = self
            .funcs
            .get(&(codec, call.dtype))
            .ok_or_else(|| kernels::unsupported_dtype("quick allreduce", call.dtype))?;
        let bytes = call.bytes();
        if call.len == 0 {
            return Ok(());
        }
        if bytes > self.max_bytes {
            return Err(Error::invalid(
                OP,
                format!(
                    "{bytes} bytes exceed the {} bytes of the inboxes (raise TPCOMM_QUICK_MAX_BYTES)",
                    self.max_bytes
                ),
            ));
        }
        let blocks = grid_blocks(call.len, self.world, self.max_blocks);
        let rank = self.rank as i32;
        let count = call.len as u64;
        let timeout_ns = crate::runtime::timeout_ns(self.timeout);
        let err = self.err.device_ptr();
        let tag = protocol::call_tag(count, call.dtype.code(), 16 + codec as u32, &[]);
        use crate::runtime::arg;
        let mut params = [
            arg(&self.sigs),
            arg(&self.inboxes),
            arg(&call.input),
            arg(&call.output),
            arg(&rank),
            arg(&count),
            arg(&timeout_ns),
            arg(&err),
            arg(&tag),
            arg(&self.fault.word),
            arg(&self.fault.raise),
        ];
        // SAFETY: the arguments match `(Ptrs sigs, Ptrs inbox, const char* in, char* out, int rank,
        // u64 count, u64 timeout_ns, u64* err, u32 tag, u64* fault_word, u64 fault_raise)` in
        // kernels/quick_allreduce.cu; `sigs` and `inboxes` are live IPC mappings whose inboxes hold
        // the slots of `len` elements (len * size <= max_bytes, checked above); `input` and `output`
        // are valid for `len` elements (the caller's contract); `err` is the mapped host word and
        // `fault.word` the mapped fault page.
        unsafe {
            crate::runtime::launch(
                func,
                blocks,
                protocol::THREADS,
                stream,
                &mut params,
                self.pdl,
                "kernel launch (quick)",
            )
        }
    }

    fn poll(&mut self) -> Result<()> {
        kernel_error(self.err.get(), self.rank, self.timeout, &WORDS).map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inboxes_hold_the_largest_message_in_the_widest_codec() {
        // 64 MiB of bf16: 2^20 groups; 8 ranks: 2^17 groups per slot of 36 bytes, 16 slots.
        assert_eq!(inbox_bytes(8, 64 << 20), 16 * (1 << 17) * 36);
        assert_eq!(slot_bytes(Codec::Int4, 3), 64);
        assert_eq!(slot_bytes(Codec::Int6, 4), 112);
        // Uneven shards: the first shards are one group longer, and the slot holds them.
        assert!(inbox_bytes(3, 4096) >= 6 * slot_bytes(Codec::Int8, (2048usize).div_ceil(32).div_ceil(3)));
    }

    #[test]
    fn every_codec_has_its_kernels_under_its_algorithm_name() {
        let names: Vec<&str> = Codec::ALL.iter().map(|&c| Algo::quick(c).as_str()).collect();
        assert_eq!(names, kernels::QUICK.algos);
    }

    #[test]
    fn a_quad_per_group_of_the_largest_shard() {
        assert_eq!(grid_blocks(1, 8, 36), 1);
        // 8 MiB of bf16 among 8 ranks: 16384 groups per shard, 128 per block: capped.
        assert_eq!(grid_blocks(4 << 20, 8, 36), 36);
        assert_eq!(grid_blocks(4 << 20, 8, DEFAULT_MAX_BLOCKS), 128);
        assert_eq!(grid_blocks(32 * 128 * 4, 4, 36), 1);
        assert_eq!(grid_blocks(32 * 128 * 4 + 1, 4, 36), 2);
    }
}
