//! Packet allreduce: barrier-free small messages (`kernels/packet_allreduce.cu`).
//!
//! Every rank pushes its data into its peers' memory together with the proof that it landed
//! (an LL flag beside each 32-bit word, or the absence of a sentinel for Lamport push), so no
//! rank waits for a barrier: a call costs one flight of stores plus the local sum. Ranks only
//! ever read their own memory, so inputs need no registration, in place is free, and calls
//! captured into CUDA graphs need no address exchange after capture. The per-call counters
//! (LL epoch, Lamport generation) live in device memory, so graph replays continue them.
//!
//! The seed's MSCCL++ interface, mapped:
//!
//! | seed | here |
//! |---|---|
//! | `mscclpp_generate_unique_id()` | not needed: the MPI communicator is the bootstrap |
//! | `mscclpp_init_context(unique_id, rank, world_size, scratch, put_buffer, nranks_per_node, rank_to_node, rank_to_ib, context_selection)` | [`PacketAllreduce::new`] over the node's communicator (allocates its scratch and receive buffers itself; the ranks of one node; across nodes the plan composes backends) |
//! | `mscclpp_allreduce(context, inp, out, nthreads, nblocks)` | `enqueue` (threads and blocks sized to the message by [`launch_shape`]: `nthreads` is [`PacketOptions::block_threads`] (`TPCOMM_PACKET_THREADS`), `nblocks` at most [`DEFAULT_MAX_BLOCKS`]) |
//!
//! ## Memory every rank shares (CUDA IPC)
//! - **LL scratch** ([`protocol::ll_scratch_bytes`]): `[parity][source][slots]` 16-byte packets,
//!   zeroed at set-up.
//! - **Lamport buffers** ([`protocol::lamport_bytes`]): `[generation][source][slots]` vectors,
//!   filled with the sentinel at set-up and re-armed by the thread that reads each slot.
//!
//! Preconditions as for every collective: all ranks make the same calls in the same order
//! (a different length, dtype or algorithm is found through the call header and reported as
//! [`Error::Mismatch`]), and calls on one instance are serialised on one stream.

use super::custom::FaultTarget;
use super::peer_group::{check_world, export_all, kernel_error, share, KernelWords};
use super::{Call, DeviceBackend};
use crate::algo::Algo;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::{agree, barrier};
use crate::runtime::ipc::{IpcBuffer, PeerMappings};
use crate::runtime::{kernels, protocol, Context, Function, HostWord};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The packet algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PacketKernel {
    /// LL packets, all-pairs: every rank pushes its whole input to every peer (lowest latency,
    /// `n - 1` times the traffic).
    AllPairs,
    /// LL packets, two-phase: scatter shards to their owners, owners push the reduced shard.
    TwoPhase,
    /// Lamport push: raw data into sentinel-filled receive buffers, each slot re-armed by its reader.
    Lamport,
}

impl PacketKernel {
    fn of(algo: Algo) -> Result<Self> {
        match algo {
            Algo::Packet => Ok(PacketKernel::AllPairs),
            Algo::PacketTwoPhase => Ok(PacketKernel::TwoPhase),
            Algo::Lamport => Ok(PacketKernel::Lamport),
            other => Err(Error::Internal(format!("the packet backend was asked to run {other}"))),
        }
    }

    /// The algorithm part of the kernels' entry points (`kernels::PACKET.algos`).
    fn name(self) -> &'static str {
        match self {
            PacketKernel::AllPairs => "packet",
            PacketKernel::TwoPhase => "packet2",
            PacketKernel::Lamport => "lamport",
        }
    }
}

/// Settings of a [`PacketAllreduce`].
#[derive(Debug, Clone)]
pub(crate) struct PacketOptions {
    /// Largest message in bytes; sizes the scratch (about `4 * world * max_bytes` for LL and
    /// `2 * world * max_bytes` for Lamport per rank).
    pub max_bytes: usize,
    /// Limit of every wait on a peer.
    pub timeout: Duration,
    /// Ranks whose kernels share this rank's GPU (1 = own GPU); caps the grid so all of their
    /// blocks fit on the device at once.
    pub ranks_per_device: usize,
    /// Data threads per block while the grid has room (the seed's `nthreads`; a multiple of 32
    /// up to [`protocol::PACKET_THREADS`]; `None`: [`default_block_threads`]).
    pub block_threads: Option<usize>,
    /// Kernel cache directory (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
    pub fault: FaultTarget,
    /// Launch with programmatic dependent launch (`TPCOMM_PDL`).
    pub pdl: bool,
}

/// Block limit per launch before the shared-device cap (the seed's `nblocks`).
pub(crate) const DEFAULT_MAX_BLOCKS: usize = 64;

/// Data threads per block for `world` ranks: small blocks spread a small message over several
/// SMs, and with more peers each thread stores and polls more, so blocks shrink. Measured on one
/// H100 shared by all ranks (bench/RESULTS.md): 128 best at 2 ranks, 64 at 4 and 8 (4 KiB:
/// 3.17 / 4.28 / 6.30 us against 3.37 / 4.51 / 6.34 with 8 blocks of 32).
pub(crate) const fn default_block_threads(world: usize) -> usize {
    if world <= 2 {
        128
    } else {
        64
    }
}

/// Launch shape for `nvec` 16-byte vectors: `(blocks, data threads per block)`. One vector per
/// data thread in blocks of `block_threads` while the grid has room for them (at most
/// `max_blocks`); beyond that the blocks grow, to [`protocol::PACKET_THREADS`] data threads, and
/// threads take several vectors. Each block also has the header warp.
///
/// Data threads come in whole warps of `lanes` ([`crate::runtime::WAVE`]: 32 on CUDA, 64 on the
/// wave64 AMD GPUs tpcomm builds for), so the header threads, which spin on their own condition,
/// never share a warp or wavefront with data threads: a wavefront whose lanes spin on two
/// conditions may run one branch to its end before the other.
pub(crate) fn launch_shape(nvec: usize, block_threads: usize, max_blocks: usize, lanes: usize) -> (usize, usize) {
    let max_blocks = max_blocks.max(1);
    let mut threads = block_threads.next_multiple_of(lanes).clamp(lanes, protocol::PACKET_THREADS);
    if nvec.div_ceil(threads) > max_blocks {
        threads = nvec.div_ceil(max_blocks).next_multiple_of(lanes).clamp(lanes, protocol::PACKET_THREADS);
    }
    (nvec.div_ceil(threads).clamp(1, max_blocks), threads)
}

/// One rank's side of the packet allreduce.
pub(crate) struct PacketAllreduce {
    rank: usize,
    funcs: HashMap<(PacketKernel, DType), Function>,
    max_blocks: usize,
    block_threads: usize,
    max_bytes: usize,
    timeout: Duration,
    ll_ptrs: [u64; protocol::MAX_RANKS],
    lamport_ptrs: [u64; protocol::MAX_RANKS],
    state: IpcBuffer,
    err: HostWord,
    fault: FaultTarget,
    pdl: bool,
    // Dropped before our own buffers: peers' mappings close first.
    _peers: PeerMappings,
    _ll: IpcBuffer,
    _lamport: IpcBuffer,
}

/// The fallible part of [`PacketAllreduce::new`] before any exchange.
struct Prepared {
    funcs: HashMap<(PacketKernel, DType), Function>,
    max_blocks: usize,
    ll: IpcBuffer,
    lamport: IpcBuffer,
    state: IpcBuffer,
}

const KERNELS: [PacketKernel; 3] = [PacketKernel::AllPairs, PacketKernel::TwoPhase, PacketKernel::Lamport];

impl PacketAllreduce {
    /// Allocate this rank's LL scratch and Lamport buffers, exchange their IPC handles with the
    /// other ranks of `comm` (all on this node), compile or load the kernels, and wait (bounded)
    /// until every rank's buffers are initialised.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options; at most [`protocol::MAX_RANKS`] ranks.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for too many ranks, a GPU older than sm_80, or a GPU that cannot
    /// hold every rank's blocks; [`Error::Cuda`] / [`Error::Compile`]. An error on one rank makes
    /// every rank fail.
    pub(crate) fn new(comm: &SimpleCommunicator, ctx: &Arc<Context>, opts: &PacketOptions) -> Result<Self> {
        const STEP: &str = "packet allreduce set-up";
        let world = comm.size() as usize;
        let rank = comm.rank() as usize;
        check_world(world, "packet allreduce")?;
        let p = agree(comm, Self::prepare(ctx, world, opts), opts.timeout, STEP)?;
        let local = [p.ll.ptr(), p.lamport.ptr()];
        let mut peers = PeerMappings::new(ctx);
        let shared = share(comm, opts.timeout, &local, export_all(ctx, &local), &mut peers, STEP)?;
        let this = PacketAllreduce {
            rank,
            funcs: p.funcs,
            max_blocks: p.max_blocks,
            block_threads: opts.block_threads.unwrap_or(default_block_threads(world)),
            max_bytes: opts.max_bytes,
            timeout: opts.timeout,
            ll_ptrs: shared.addrs[0],
            lamport_ptrs: shared.addrs[1],
            state: p.state,
            err: HostWord::new()?,
            fault: opts.fault,
            pdl: opts.pdl,
            _peers: peers,
            _ll: p.ll,
            _lamport: p.lamport,
        };
        // Every buffer is initialised (prepare() synchronised) before any rank pushes into it.
        barrier(comm, opts.timeout, STEP)?;
        Ok(this)
    }

    fn prepare(ctx: &Arc<Context>, world: usize, opts: &PacketOptions) -> Result<Prepared> {
        let (funcs, _) = kernels::PACKET.load(
            ctx,
            world,
            opts.cache_dir.clone(),
            &KERNELS,
            PacketKernel::name,
            "the packet allreduce",
        )?;
        let cap = crate::runtime::co_resident_blocks(
            ctx,
            funcs.values(),
            protocol::PACKET_THREADS + protocol::PACKET_HEADER_THREADS,
            opts.ranks_per_device,
            "packet allreduce",
        )?;
        let max_blocks = DEFAULT_MAX_BLOCKS.clamp(1, protocol::PACKET_MAX_BLOCKS).min(cap);
        let ll = IpcBuffer::alloc_signal(ctx, protocol::ll_scratch_bytes(world, opts.max_bytes))?;
        ll.zero()?;
        let lamport = IpcBuffer::alloc_signal(ctx, protocol::lamport_bytes(world, opts.max_bytes))?;
        lamport.fill(0xff)?;
        let state = IpcBuffer::alloc(ctx, protocol::PACKET_STATE_BYTES)?;
        state.zero()?;
        Ok(Prepared { funcs, max_blocks, ll, lamport, state })
    }

    /// Most blocks of one launch (after the shared-device cap).
    pub(crate) fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// # Safety
    /// As [`DeviceBackend::enqueue`].
    unsafe fn launch(&mut self, kernel: PacketKernel, call: &Call) -> Result<()> {
        const OP: &str = "packet all_reduce";
        let stream = call.stream.device()?;
        let dtype = call.dtype;
        let func =
            self.funcs.get(&(kernel, dtype)).ok_or_else(|| kernels::unsupported_dtype("packet allreduce", dtype))?;
        let bytes = call.bytes();
        if bytes > self.max_bytes {
            return Err(Error::invalid(
                OP,
                format!(
                    "{bytes} bytes exceed the packet buffers of {} bytes (TPCOMM_PACKET_BUFFER_BYTES)",
                    self.max_bytes
                ),
            ));
        }
        let (scratch, slots) = match kernel {
            PacketKernel::AllPairs | PacketKernel::TwoPhase => (&self.ll_ptrs, protocol::ll_slots(self.max_bytes)),
            PacketKernel::Lamport => (&self.lamport_ptrs, protocol::lamport_slots(self.max_bytes)),
        };
        let (blocks, threads) = launch_shape(
            bytes.div_ceil(protocol::VEC_BYTES),
            self.block_threads,
            self.max_blocks,
            crate::runtime::WAVE,
        );
        let state = self.state.ptr();
        let rank = self.rank as i32;
        let count = call.len as u64;
        let slots = slots as u64;
        let timeout_ns = crate::runtime::timeout_ns(self.timeout);
        let err = self.err.device_ptr();
        let tag = protocol::packet_tag(count, dtype.code(), 16 + kernel as u32);
        use crate::runtime::arg;
        let mut params = [
            arg(&call.input),
            arg(&call.output),
            arg(scratch),
            arg(&state),
            arg(&rank),
            arg(&count),
            arg(&slots),
            arg(&timeout_ns),
            arg(&err),
            arg(&tag),
            arg(&self.fault.word),
            arg(&self.fault.raise),
        ];
        // SAFETY: the arguments match `(const char* in, char* out, Ptrs scratch, PacketState* st,
        // int rank, u64 count, u64 slots, u64 timeout_ns, u64* err, u32 tag, u64* fault_word,
        // u64 fault_raise)` of kernels/packet_allreduce.cu (types as declared above); `scratch` holds
        // live IPC mappings sized for `slots`, `state` is this rank's state area, input/output are
        // valid for `len` elements (caller), `err` is the mapped host word and `fault.word` the mapped
        // fault page.
        unsafe {
            crate::runtime::launch(
                func,
                blocks,
                threads + protocol::PACKET_HEADER_THREADS,
                stream,
                &mut params,
                self.pdl,
                "kernel launch (packet)",
            )
        }
    }
}

/// How the packet kernels' errors read.
const WORDS: KernelWords = KernelWords {
    op: "packet all_reduce",
    family: "packet allreduce",
    wait: |id| match id {
        protocol::WAIT_HEADER => "packet allreduce: waiting for a peer's call header",
        protocol::WAIT_RESULT => "packet allreduce: waiting for a peer's reduced shard",
        _ => "packet allreduce: waiting for a peer's data",
    },
};

impl DeviceBackend for PacketAllreduce {
    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()> {
        // Packets read only their own memory: registered, staged and captured inputs are one
        // path, and captures need nothing exchanged afterwards. A call of no data still sends
        // and checks the call headers: the flag-exchange floor (`allreduce_perf --floor`).
        let kernel = PacketKernel::of(algo)?;
        // SAFETY: the caller's contract.
        unsafe { self.launch(kernel, call) }
    }

    fn poll(&mut self) -> Result<()> {
        kernel_error(self.err.get(), self.rank, self.timeout, &WORDS).map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::BackendKind;

    #[test]
    fn small_messages_spread_over_blocks_large_ones_fill_them() {
        assert_eq!(launch_shape(0, 128, 64, 32), (1, 128));
        assert_eq!(launch_shape(256, 128, 64, 32), (2, 128)); // 4 KiB at 2 ranks
        assert_eq!(launch_shape(256, 64, 64, 32), (4, 64)); // 4 KiB at 4-8 ranks
        assert_eq!(launch_shape(2048, 64, 64, 32), (32, 64)); // 32 KiB
        assert_eq!(launch_shape(4096, 64, 64, 32), (64, 64));
        assert_eq!(launch_shape(4097, 64, 64, 32), (43, 96));
        assert_eq!(launch_shape(1 << 20, 64, 64, 32), (64, 256));
        assert_eq!(launch_shape(1 << 20, 64, 0, 32), (1, 256));
        assert_eq!(launch_shape(100, 40, 64, 32), (2, 64));
        for nvec in 0..20_000 {
            for bt in [32, 64, 128, 256] {
                let (b, t) = launch_shape(nvec, bt, 64, 32);
                assert!(t % 32 == 0 && t <= protocol::PACKET_THREADS && (1..=64).contains(&b));
                assert!(b * t >= nvec.min(64 * protocol::PACKET_THREADS), "{nvec} {bt}: {b} x {t}");
            }
        }
    }

    #[test]
    fn wavefronts_of_64_lanes_keep_data_threads_in_whole_wavefronts() {
        assert_eq!(launch_shape(256, 128, 64, 64), (2, 128));
        assert_eq!(launch_shape(100, 40, 64, 64), (2, 64));
        assert_eq!(launch_shape(4097, 64, 64, 64), (33, 128), "32-lane rounding would give 96");
        for nvec in 0..20_000 {
            for bt in [32, 64, 96, 128, 256] {
                let (b, t) = launch_shape(nvec, bt, 64, 64);
                assert!(t % 64 == 0 && t <= protocol::PACKET_THREADS && (1..=64).contains(&b), "{nvec} {bt}");
                assert!(b * t >= nvec.min(64 * protocol::PACKET_THREADS), "{nvec} {bt}: {b} x {t}");
            }
        }
    }

    #[test]
    fn every_kernel_is_an_algorithm_of_the_family_and_of_the_table() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name()).collect();
        assert_eq!(names, kernels::PACKET.algos);
        for algo in [Algo::Packet, Algo::PacketTwoPhase, Algo::Lamport] {
            assert_eq!(algo.info().backend, Some(BackendKind::Packet));
            assert_eq!(PacketKernel::of(algo).unwrap().name(), algo.as_str());
        }
        assert!(PacketKernel::of(Algo::OneShot).is_err());
    }
}
