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
//! | `mscclpp_init_context(unique_id, rank, world_size, scratch, put_buffer, nranks_per_node, rank_to_node, rank_to_ib, context_selection)` | [`PacketAllreduce::new`] over the node's communicator (allocates its scratch and receive buffers itself; the ranks of one node; across nodes the [`crate::Communicator`] composes backends) |
//! | `mscclpp_allreduce(context, inp, out, nthreads, nblocks)` | [`PacketAllreduce::all_reduce`] (threads and blocks sized to the message by [`launch_shape`]: `nthreads` is [`PacketOptions::block_threads`] (`TPCOMM_PACKET_THREADS`), `nblocks` at most [`PacketOptions::max_blocks`]) |
//!
//! ## Memory every rank shares (CUDA IPC)
//! - **LL scratch** ([`protocol::ll_scratch_bytes`]): `[parity][source][slots]` 16-byte packets,
//!   zeroed at set-up.
//! - **Lamport buffers** ([`protocol::lamport_bytes`]): `[generation][source][slots]` vectors,
//!   filled with the sentinel at set-up.
//!
//! Preconditions as for every collective: all ranks make the same calls in the same order
//! (a different length, dtype or algorithm is found through the call header and reported as
//! [`Error::Mismatch`]), and calls on one instance are serialised on one stream.

use crate::bootstrap::agree;
use crate::cuda::ipc::{IpcBuffer, IpcHandle, PeerMappings, IPC_HANDLE_BYTES};
use crate::cuda::module_cache::ModuleCache;
use crate::cuda::{cuda, kernels, protocol, HostWord};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use mpi::collective::CommunicatorCollectives;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The packet algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKernel {
    /// LL packets, all-pairs: every rank pushes its whole input to every peer (lowest latency,
    /// `n - 1` times the traffic).
    AllPairs,
    /// LL packets, two-phase: scatter shards to their owners, owners push the reduced shard.
    TwoPhase,
    /// Lamport push: raw data into sentinel-filled receive buffers, re-armed one call later.
    Lamport,
}

impl PacketKernel {
    fn entry(self, dtype: DType) -> Option<&'static str> {
        Some(match (self, dtype) {
            (PacketKernel::AllPairs, DType::F32) => "packet_f32",
            (PacketKernel::AllPairs, DType::F16) => "packet_f16",
            (PacketKernel::AllPairs, DType::BF16) => "packet_bf16",
            (PacketKernel::TwoPhase, DType::F32) => "packet2_f32",
            (PacketKernel::TwoPhase, DType::F16) => "packet2_f16",
            (PacketKernel::TwoPhase, DType::BF16) => "packet2_bf16",
            (PacketKernel::Lamport, DType::F32) => "lamport_f32",
            (PacketKernel::Lamport, DType::F16) => "lamport_f16",
            (PacketKernel::Lamport, DType::BF16) => "lamport_bf16",
            (_, DType::F64) => return None,
        })
    }
}

/// Settings of a [`PacketAllreduce`].
#[derive(Debug, Clone)]
pub struct PacketOptions {
    /// Largest message in bytes; sizes the scratch (about `4 * world * max_bytes` for LL and
    /// `3 * world * max_bytes` for Lamport per rank).
    pub max_bytes: usize,
    /// Limit of every wait on a peer.
    pub timeout: Duration,
    /// Ranks whose kernels share this rank's GPU (1 = own GPU); caps the grid so all of their
    /// blocks fit on the device at once.
    pub ranks_per_device: usize,
    /// Most blocks of one launch (`None`: [`DEFAULT_MAX_BLOCKS`]), before the shared-device cap.
    pub max_blocks: Option<usize>,
    /// Data threads per block while the grid has room (the seed's `nthreads`; a multiple of 32
    /// up to [`protocol::PACKET_THREADS`]; `None`: [`default_block_threads`]).
    pub block_threads: Option<usize>,
    /// Kernel cache directory (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
}

/// Default block limit per launch before the shared-device cap.
pub const DEFAULT_MAX_BLOCKS: usize = 64;

/// Data threads per block for `world` ranks: small blocks spread a small message over several
/// SMs, and with more peers each thread stores and polls more, so blocks shrink. Measured on one
/// H100 shared by all ranks (bench/RESULTS.md): 128 best at 2 ranks, 64 at 4 and 8 (4 KiB:
/// 3.17 / 4.28 / 6.30 us against 3.37 / 4.51 / 6.34 with 8 blocks of 32).
pub const fn default_block_threads(world: usize) -> usize {
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
pub fn launch_shape(nvec: usize, block_threads: usize, max_blocks: usize) -> (usize, usize) {
    let max_blocks = max_blocks.max(1);
    let mut threads = block_threads.next_multiple_of(32).clamp(32, protocol::PACKET_THREADS);
    if nvec.div_ceil(threads) > max_blocks {
        threads = nvec.div_ceil(max_blocks).next_multiple_of(32).clamp(32, protocol::PACKET_THREADS);
    }
    (nvec.div_ceil(threads).clamp(1, max_blocks), threads)
}

/// One rank's side of the packet allreduce.
pub struct PacketAllreduce {
    rank: usize,
    world: usize,
    funcs: HashMap<(PacketKernel, DType), CudaFunction>,
    max_blocks: usize,
    block_threads: usize,
    max_bytes: usize,
    timeout: Duration,
    ll_ptrs: [u64; protocol::MAX_RANKS],
    lamport_ptrs: [u64; protocol::MAX_RANKS],
    state: IpcBuffer,
    err: HostWord,
    // Dropped before our own buffers: peers' mappings close first.
    _peers: PeerMappings,
    _ll: IpcBuffer,
    _lamport: IpcBuffer,
}

/// The fallible part of [`PacketAllreduce::new`] before any exchange.
struct Prepared {
    funcs: HashMap<(PacketKernel, DType), CudaFunction>,
    max_blocks: usize,
    ll: IpcBuffer,
    lamport: IpcBuffer,
    state: IpcBuffer,
}

const KERNELS: [PacketKernel; 3] = [PacketKernel::AllPairs, PacketKernel::TwoPhase, PacketKernel::Lamport];

impl PacketAllreduce {
    /// Allocate this rank's LL scratch and Lamport buffers, exchange their IPC handles with the
    /// other ranks of `comm` (all on this node), compile or load the kernels, and wait until
    /// every rank's buffers are initialised.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options; at most [`protocol::MAX_RANKS`] ranks.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for too many ranks or a GPU that cannot hold every rank's blocks;
    /// [`Error::Cuda`] / [`Error::Compile`]. An error on one rank makes every rank fail.
    pub fn new<C: mpi::traits::Communicator>(comm: &C, ctx: &Arc<CudaContext>, opts: &PacketOptions) -> Result<Self> {
        let world = comm.size() as usize;
        let rank = comm.rank() as usize;
        if world > protocol::MAX_RANKS {
            return Err(Error::Unsupported {
                what: format!("packet allreduce over {world} ranks of one node"),
                reason: format!("it spans at most {} ranks", protocol::MAX_RANKS),
            });
        }
        let p = agree(comm, Self::prepare(ctx, world, opts), "packet allreduce set-up")?;
        let mine = (|| -> Result<Vec<u8>> {
            let mut blob = p.ll.handle()?.0.to_vec();
            blob.extend_from_slice(&p.lamport.handle()?.0);
            Ok(blob)
        })();
        let mine = agree(comm, mine, "exporting packet IPC handles")?;
        let all = crate::bootstrap::all_gather_bytes(comm, &mine);
        let mut peers = PeerMappings::new(ctx);
        let mut ll_ptrs = [0u64; protocol::MAX_RANKS];
        let mut lamport_ptrs = [0u64; protocol::MAX_RANKS];
        let opened = (|| -> Result<()> {
            for (r, blob) in all.iter().enumerate() {
                if r == rank {
                    (ll_ptrs[r], lamport_ptrs[r]) = (p.ll.ptr(), p.lamport.ptr());
                    continue;
                }
                let h =
                    |i: usize| IpcHandle(blob[i * IPC_HANDLE_BYTES..(i + 1) * IPC_HANDLE_BYTES].try_into().unwrap());
                ll_ptrs[r] = peers.open(&h(0))?;
                lamport_ptrs[r] = peers.open(&h(1))?;
            }
            Ok(())
        })();
        agree(comm, opened, "opening peers' packet buffers")?;
        let this = PacketAllreduce {
            rank,
            world,
            funcs: p.funcs,
            max_blocks: p.max_blocks,
            block_threads: opts.block_threads.unwrap_or(default_block_threads(world)),
            max_bytes: opts.max_bytes,
            timeout: opts.timeout,
            ll_ptrs,
            lamport_ptrs,
            state: p.state,
            err: HostWord::new()?,
            _peers: peers,
            _ll: p.ll,
            _lamport: p.lamport,
        };
        // Every buffer is initialised (prepare() synchronised) before any rank pushes into it.
        comm.barrier();
        Ok(this)
    }

    fn prepare(ctx: &Arc<CudaContext>, world: usize, opts: &PacketOptions) -> Result<Prepared> {
        let cache = ModuleCache::new(ctx, opts.cache_dir.clone())?;
        let module = cache.module(
            kernels::PACKET_ALLREDUCE_NAME,
            kernels::PACKET_ALLREDUCE,
            &protocol::packet_defines(world),
        )?;
        let mut funcs = HashMap::new();
        for kernel in KERNELS {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let name = kernel.entry(dtype).expect("listed dtypes have kernels");
                funcs.insert((kernel, dtype), module.load_function(name).map_err(cuda("cuModuleGetFunction"))?);
            }
        }
        let cap = crate::cuda::co_resident_blocks(
            ctx,
            funcs.values(),
            protocol::PACKET_THREADS + protocol::PACKET_HEADER_THREADS,
            opts.ranks_per_device,
            "packet allreduce",
        )?;
        let max_blocks = opts.max_blocks.unwrap_or(DEFAULT_MAX_BLOCKS).clamp(1, protocol::PACKET_MAX_BLOCKS).min(cap);
        let ll = IpcBuffer::alloc(ctx, protocol::ll_scratch_bytes(world, opts.max_bytes))?;
        ll.zero()?;
        let lamport = IpcBuffer::alloc(ctx, protocol::lamport_bytes(world, opts.max_bytes))?;
        lamport.fill(0xff)?;
        let state = IpcBuffer::alloc(ctx, protocol::PACKET_STATE_BYTES)?;
        state.zero()?;
        Ok(Prepared { funcs, max_blocks, ll, lamport, state })
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Largest message in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Most blocks of one launch (after the shared-device cap).
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Sum `len` elements of `dtype` at `input` over all ranks into `output` (may equal
    /// `input`) with `kernel`, on `stream`. `len == 0` still exchanges the call header with
    /// every peer: one flag per peer, the floor of any cross-rank call (`allreduce_perf
    /// --floor`).
    ///
    /// Outside stream capture the call waits for the kernel and reports a failure; while
    /// `stream` is capturing it is only recorded (read errors of replays with
    /// [`PacketAllreduce::check_error`]).
    ///
    /// # Safety
    /// `input` and `output` must be device memory of this context valid for `len` elements of
    /// `dtype`, not written by other work while the call (or a replay of its capture) runs.
    ///
    /// # Collective
    /// Every rank, same `len`, `dtype` and `kernel`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for pointers not 16-byte aligned or a message over
    /// `max_bytes`; [`Error::Unsupported`] for f64; [`Error::PeerTimeout`]; [`Error::Mismatch`]
    /// when a peer made another call; [`Error::Cuda`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_reduce(
        &self,
        stream: &Arc<CudaStream>,
        kernel: PacketKernel,
        dtype: DType,
        input: u64,
        output: u64,
        len: usize,
    ) -> Result<()> {
        const OP: &str = "packet all_reduce";
        let name = crate::cuda::check_launch(OP, "packet allreduce", kernel.entry(dtype), dtype, input, output)?;
        let bytes = len * dtype.size();
        if bytes > self.max_bytes {
            return Err(Error::invalid(
                OP,
                format!(
                    "{bytes} bytes exceed the packet scratch of {} bytes (raise TPCOMM_PACKET_BUFFER_BYTES)",
                    self.max_bytes
                ),
            ));
        }
        let func = self.funcs.get(&(kernel, dtype)).ok_or_else(|| Error::Internal(format!("{name} not loaded")))?;
        let (scratch, slots) = match kernel {
            PacketKernel::AllPairs | PacketKernel::TwoPhase => (&self.ll_ptrs, protocol::ll_slots(self.max_bytes)),
            PacketKernel::Lamport => (&self.lamport_ptrs, protocol::lamport_slots(self.max_bytes)),
        };
        let (blocks, threads) = launch_shape(bytes.div_ceil(protocol::VEC_BYTES), self.block_threads, self.max_blocks);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: ((threads + protocol::PACKET_HEADER_THREADS) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let capturing = crate::cuda::is_capturing(stream)?;
        let state = self.state.ptr();
        let rank = self.rank as i32;
        let count = len as u64;
        let slots = slots as u64;
        let timeout_ns = crate::cuda::timeout_ns(self.timeout);
        let err = self.err.device_ptr();
        let tag = protocol::packet_tag(count, dtype.code(), 16 + kernel as u32);
        let mut launch = stream.launch_builder(func);
        launch.arg(&input).arg(&output).arg(scratch).arg(&state).arg(&rank).arg(&count).arg(&slots);
        launch.arg(&timeout_ns).arg(&err).arg(&tag);
        // SAFETY: the arguments match `(const char* in, char* out, Ptrs scratch, PacketState* st,
        // int rank, u64 count, u64 slots, u64 timeout_ns, u64* err, u32 tag)` of
        // kernels/packet_allreduce.cu; `scratch` holds live IPC mappings sized for `slots`,
        // `state` is this rank's state area, input/output are valid for `len` elements (caller),
        // `err` is the mapped host word.
        unsafe { launch.launch(cfg) }.map_err(cuda("cuLaunchKernel(packet allreduce)"))?;
        if capturing {
            return Ok(());
        }
        stream.synchronize().map_err(cuda("cuStreamSynchronize(packet allreduce)"))?;
        self.check_error()
    }

    /// Report a failure recorded by any packet kernel since set-up. Call after synchronising
    /// with the stream that ran them (for example after replaying a captured graph).
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] naming the peer (rank in this group) whose data never came;
    /// [`Error::Mismatch`] naming a peer that made another call.
    pub fn check_error(&self) -> Result<()> {
        let Some(t) = protocol::decode_error(self.err.get()) else { return Ok(()) };
        if t.kind == protocol::BarrierErrorKind::Mismatch {
            return Err(Error::Mismatch {
                op: "packet all_reduce",
                detail: format!(
                    "rank {} called with another length, dtype or algorithm than rank {}",
                    t.peer, self.rank
                ),
            });
        }
        Err(Error::PeerTimeout {
            op: match t.barrier {
                protocol::WAIT_HEADER => "packet allreduce: waiting for a peer's call header",
                protocol::WAIT_RESULT => "packet allreduce: waiting for a peer's reduced shard",
                _ => "packet allreduce: waiting for a peer's data",
            },
            peer: Some(t.peer),
            waited: self.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_messages_spread_over_blocks_large_ones_fill_them() {
        assert_eq!(launch_shape(0, 128, 64), (1, 128));
        assert_eq!(launch_shape(256, 128, 64), (2, 128)); // 4 KiB at 2 ranks
        assert_eq!(launch_shape(256, 64, 64), (4, 64)); // 4 KiB at 4-8 ranks
        assert_eq!(launch_shape(2048, 64, 64), (32, 64)); // 32 KiB
        assert_eq!(launch_shape(4096, 64, 64), (64, 64));
        assert_eq!(launch_shape(4097, 64, 64), (43, 96));
        assert_eq!(launch_shape(1 << 20, 64, 64), (64, 256));
        assert_eq!(launch_shape(1 << 20, 64, 0), (1, 256));
        assert_eq!(launch_shape(100, 40, 64), (2, 64));
        for nvec in 0..20_000 {
            for bt in [32, 64, 128, 256] {
                let (b, t) = launch_shape(nvec, bt, 64);
                assert!(t % 32 == 0 && t <= protocol::PACKET_THREADS && (1..=64).contains(&b));
                assert!(b * t >= nvec.min(64 * protocol::PACKET_THREADS), "{nvec} {bt}: {b} x {t}");
            }
        }
    }

    #[test]
    fn every_kernel_has_an_entry_per_float_type() {
        for k in KERNELS {
            for d in [DType::F32, DType::F16, DType::BF16] {
                let name = k.entry(d).unwrap();
                assert!(kernels::PACKET_ALLREDUCE_ENTRIES.contains(&name), "{name}");
            }
            assert_eq!(k.entry(DType::F64), None);
        }
    }
}
