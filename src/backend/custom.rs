//! Custom allreduce over CUDA IPC: one-shot and two-shot kernels (`kernels/custom_allreduce.cu`).
//!
//! The seed's interface, mapped:
//!
//! | seed | here |
//! |---|---|
//! | `init_custom_ar(ipc_tensors, rank_data, rank, full_nvlink)` | [`CustomAllreduce::new`] (allocates and exchanges its IPC buffers itself) |
//! | `all_reduce(fa, inp, out, reg_buffer, reg_buffer_sz_bytes)` | [`CustomAllreduce::all_reduce`] (staged when [`Mode::Staged`]) |
//! | `dispose(fa)` | `Drop` |
//! | `meta_size()` | [`meta_size`] |
//! | `register_buffer(fa, fake_ipc_ptrs)` | [`CustomAllreduce::register_buffer`] |
//! | `get_graph_buffer_ipc_meta(fa)` | [`CustomAllreduce::graph_buffer_ipc_meta`] |
//! | `register_graph_buffers(fa, handles, offsets)` | [`CustomAllreduce::register_graph_buffers`] |
//!
//! ## Memory every rank shares (CUDA IPC, from `cuMemAlloc`)
//! - **signal** ([`meta_size`] bytes): barrier mailboxes and counters, zeroed and MPI-barriered
//!   before the first kernel.
//! - **scratch** (`max_bytes`): two-shot's reduced shards; element `k` always lives at byte
//!   `k * size_of::<T>()`, whatever the message size or grid.
//! - **staging** (`max_bytes`): unregistered inputs are copied here first.
//!
//! ## The rank-data table (device memory, local)
//! Row `i` holds one buffer's address in every rank's address space. Row 0 is the staging
//! buffers; registered buffers get a row per offset used; calls captured into a CUDA graph get a
//! reserved row each, filled after capture by [`CustomAllreduce::register_graph_buffers`]. A
//! kernel receives a pointer to its row, so a captured launch has fixed arguments and the row
//! can be filled after capture.
//!
//! Preconditions (as for every collective): all ranks make the same calls in the same order with
//! the same length, dtype and algorithm, and calls on one instance are serialised.

use crate::bootstrap::agree;
use crate::cuda::ipc::{self, IpcBuffer, IpcHandle, PeerMappings, IPC_HANDLE_BYTES};
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

/// Bytes of one rank's signal area (the seed's `meta_size()`).
pub fn meta_size() -> usize {
    protocol::SIGNAL_BYTES
}

/// Rows of the rank-data table (registered buffers, their offsets and captured calls).
pub const RANK_DATA_ROWS: usize = 8192;

/// Default block limit per launch (the seed's 36 on H100), before the shared-device cap.
pub const DEFAULT_MAX_BLOCKS: usize = 36;

/// The kernels' algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Every rank reads all inputs.
    OneShot,
    /// Reduce-scatter, then all-gather.
    TwoShot,
}

/// How the kernel finds the peers' inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The input lies in a buffer registered with [`CustomAllreduce::register_buffer`].
    Registered,
    /// The input is first copied into this rank's IPC staging buffer.
    Staged,
}

/// Settings of a [`CustomAllreduce`].
#[derive(Debug, Clone)]
pub struct CustomOptions {
    /// Size of the staging and scratch buffers: the largest staged or two-shot message.
    pub max_bytes: usize,
    /// Spin limit of every barrier.
    pub timeout: Duration,
    /// Ranks whose kernels share this rank's GPU (1 = own GPU); caps the grid so all of their
    /// blocks fit on the device at once.
    pub ranks_per_device: usize,
    /// Kernel cache directory (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
}

/// What one rank says about the buffers its captured calls read: the seed's
/// `get_graph_buffer_ipc_meta` result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphMeta {
    /// IPC handle of each buffer's allocation.
    pub handles: Vec<IpcHandle>,
    /// Offset of each buffer inside its allocation.
    pub offsets: Vec<u64>,
}

impl GraphMeta {
    /// Serialise for an MPI exchange.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.handles.len() * (IPC_HANDLE_BYTES + 8));
        out.extend_from_slice(&(self.handles.len() as u64).to_le_bytes());
        for (h, o) in self.handles.iter().zip(&self.offsets) {
            out.extend_from_slice(&h.0);
            out.extend_from_slice(&o.to_le_bytes());
        }
        out
    }

    /// Parse [`GraphMeta::to_bytes`].
    ///
    /// # Errors
    /// [`Error::Internal`] on a malformed blob.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = || Error::Internal(format!("malformed graph metadata of {} bytes", b.len()));
        let n = u64::from_le_bytes(b.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        if b.len() != 8 + n * (IPC_HANDLE_BYTES + 8) {
            return Err(bad());
        }
        let mut meta = GraphMeta::default();
        for rec in b[8..].chunks_exact(IPC_HANDLE_BYTES + 8) {
            meta.handles.push(IpcHandle(rec[..IPC_HANDLE_BYTES].try_into().map_err(|_| bad())?));
            meta.offsets.push(u64::from_le_bytes(rec[IPC_HANDLE_BYTES..].try_into().map_err(|_| bad())?));
        }
        Ok(meta)
    }
}

/// A registered buffer: its local range and its base in every rank, plus the rows made for
/// the offsets used so far.
struct Registered {
    base: u64,
    bytes: usize,
    bases: [u64; protocol::MAX_RANKS],
    rows: HashMap<u64, usize>,
}

/// One rank's side of the custom allreduce.
pub struct CustomAllreduce {
    ctx: Arc<CudaContext>,
    rank: usize,
    world: usize,
    funcs: HashMap<(Kernel, DType), CudaFunction>,
    max_blocks: usize,
    max_bytes: usize,
    timeout: Duration,
    sigs: [u64; protocol::MAX_RANKS],
    scratch_ptrs: [u64; protocol::MAX_RANKS],
    staging: IpcBuffer,
    rank_data: IpcBuffer,
    rows: usize,
    registered: Vec<Registered>,
    /// Calls captured since the last [`CustomAllreduce::register_graph_buffers`]: the local
    /// address the kernel reads and the reserved row.
    graph_pending: Vec<(u64, usize)>,
    err: HostWord,
    kernels_from_disk: bool,
    // Dropped last-but-one: peers' mappings close before our own buffers are freed.
    peers: PeerMappings,
    _signal: IpcBuffer,
    _scratch: IpcBuffer,
}

fn kernel_name(kernel: Kernel, dtype: DType) -> Option<&'static str> {
    Some(match (kernel, dtype) {
        (Kernel::OneShot, DType::F32) => "oneshot_f32",
        (Kernel::OneShot, DType::F16) => "oneshot_f16",
        (Kernel::OneShot, DType::BF16) => "oneshot_bf16",
        (Kernel::TwoShot, DType::F32) => "twoshot_f32",
        (Kernel::TwoShot, DType::F16) => "twoshot_f16",
        (Kernel::TwoShot, DType::BF16) => "twoshot_bf16",
        (_, DType::F64) => return None,
    })
}

/// Blocks for `work_vecs` vectors of work per rank, within `max_blocks`.
pub fn grid_blocks(work_vecs: usize, max_blocks: usize) -> usize {
    work_vecs.div_ceil(protocol::THREADS).clamp(1, max_blocks.max(1))
}

/// Rank `r`'s two-shot shard of `nvec` vectors, as the kernel cuts it.
pub fn shard(nvec: usize, world: usize, r: usize) -> std::ops::Range<usize> {
    let (base, rem) = (nvec / world, nvec % world);
    let start = r * base + r.min(rem);
    start..start + base + usize::from(r < rem)
}

impl CustomAllreduce {
    /// Allocate this rank's signal, scratch and staging buffers, exchange their IPC handles with
    /// the other ranks of `comm` (all on this node), compile or load the kernels, and wait until
    /// every rank has zeroed its signal area.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options; `comm` must span at most
    /// [`protocol::MAX_RANKS`] ranks.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for too many ranks, or when the shared device cannot hold every
    /// rank's blocks at once; [`Error::Cuda`] / [`Error::Compile`] from allocation, IPC or
    /// compilation. An error on one rank makes every rank return an error.
    pub fn new<C: mpi::traits::Communicator>(comm: &C, ctx: &Arc<CudaContext>, opts: &CustomOptions) -> Result<Self> {
        let world = comm.size() as usize;
        let rank = comm.rank() as usize;
        if world > protocol::MAX_RANKS {
            return Err(Error::Unsupported {
                what: format!("custom allreduce over {world} ranks of one node"),
                reason: format!("it spans at most {} ranks", protocol::MAX_RANKS),
            });
        }
        // Every step that can fail on one rank is followed by an agreement, so no rank is left
        // waiting in an exchange the others skipped.
        let (funcs, max_blocks, signal, scratch, staging, kernels_from_disk) =
            agree(comm, Self::prepare(ctx, world, opts), "custom allreduce set-up")?;

        let mine = (|| -> Result<Vec<u8>> {
            let mut blob = Vec::with_capacity(3 * IPC_HANDLE_BYTES);
            for b in [&signal, &scratch, &staging] {
                blob.extend_from_slice(&b.handle()?.0);
            }
            Ok(blob)
        })();
        let mine = agree(comm, mine, "exporting IPC handles")?;
        let all = crate::bootstrap::all_gather_bytes(comm, &mine);

        let mut peers = PeerMappings::new(ctx);
        let mut sigs = [0u64; protocol::MAX_RANKS];
        let mut scratch_ptrs = [0u64; protocol::MAX_RANKS];
        let mut staging_ptrs = [0u64; protocol::MAX_RANKS];
        let opened = (|| -> Result<()> {
            for (r, blob) in all.iter().enumerate() {
                if r == rank {
                    sigs[r] = signal.ptr();
                    scratch_ptrs[r] = scratch.ptr();
                    staging_ptrs[r] = staging.ptr();
                    continue;
                }
                let h =
                    |i: usize| IpcHandle(blob[i * IPC_HANDLE_BYTES..(i + 1) * IPC_HANDLE_BYTES].try_into().unwrap());
                sigs[r] = peers.open(&h(0))?;
                scratch_ptrs[r] = peers.open(&h(1))?;
                staging_ptrs[r] = peers.open(&h(2))?;
            }
            Ok(())
        })();
        agree(comm, opened, "opening peers' IPC handles")?;

        let rank_data = IpcBuffer::alloc(ctx, RANK_DATA_ROWS * protocol::RANK_DATA_ROW_BYTES);
        let rank_data = agree(comm, rank_data, "allocating the rank-data table")?;
        let this = CustomAllreduce {
            ctx: ctx.clone(),
            rank,
            world,
            funcs,
            max_blocks,
            max_bytes: opts.max_bytes,
            timeout: opts.timeout,
            sigs,
            scratch_ptrs,
            staging,
            rank_data,
            rows: 1,
            registered: Vec::new(),
            graph_pending: Vec::new(),
            err: HostWord::new()?,
            kernels_from_disk,
            peers,
            _signal: signal,
            _scratch: scratch,
        };
        let written = this.write_row(0, &staging_ptrs);
        agree(comm, written, "writing the staging row")?;
        // Every signal area is zero (prepare() synchronised) before any rank launches a kernel.
        comm.barrier();
        Ok(this)
    }

    fn prepare(ctx: &Arc<CudaContext>, world: usize, opts: &CustomOptions) -> Result<Prepared> {
        let cache = ModuleCache::new(ctx, opts.cache_dir.clone())?;
        let module =
            cache.module(kernels::CUSTOM_ALLREDUCE_NAME, kernels::CUSTOM_ALLREDUCE, &protocol::defines(world))?;
        let mut funcs = HashMap::new();
        for kernel in [Kernel::OneShot, Kernel::TwoShot] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let name = kernel_name(kernel, dtype).expect("listed dtypes have kernels");
                let f = module.load_function(name).map_err(cuda("cuModuleGetFunction"))?;
                funcs.insert((kernel, dtype), f);
            }
        }
        let cap = crate::cuda::co_resident_blocks(
            ctx,
            funcs.values(),
            protocol::THREADS,
            opts.ranks_per_device,
            "custom allreduce",
        )?;
        let max_blocks = DEFAULT_MAX_BLOCKS.min(protocol::MAX_BLOCKS).min(cap);
        let signal = IpcBuffer::alloc(ctx, meta_size())?;
        signal.zero()?;
        let scratch = IpcBuffer::alloc(ctx, opts.max_bytes)?;
        let staging = IpcBuffer::alloc(ctx, opts.max_bytes)?;
        Ok((funcs, max_blocks, signal, scratch, staging, cache.disk_hits() > 0))
    }

    /// Rank in the custom allreduce's group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Largest staged or two-shot message in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Most blocks of one launch (after the shared-device cap).
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// True when the kernels' CUBIN came from the disk cache rather than NVRTC.
    pub fn kernels_from_disk_cache(&self) -> bool {
        self.kernels_from_disk
    }

    /// Rows of the rank-data table in use.
    pub fn rows_used(&self) -> usize {
        self.rows
    }

    fn write_row(&self, row: usize, ptrs: &[u64; protocol::MAX_RANKS]) -> Result<()> {
        let bytes: Vec<u8> = ptrs.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.rank_data.write_at(row * protocol::RANK_DATA_ROW_BYTES, &bytes)
    }

    fn reserve_row(&mut self) -> Result<usize> {
        if self.rows >= RANK_DATA_ROWS {
            return Err(Error::Unsupported {
                what: "another registered buffer offset or captured allreduce".into(),
                reason: format!("the rank-data table is full ({RANK_DATA_ROWS} rows)"),
            });
        }
        self.rows += 1;
        Ok(self.rows - 1)
    }

    /// Register the buffer `[ptr, ptr + bytes)` (allocated with `cuMemAlloc`, e.g. an
    /// [`IpcBuffer`]) so calls whose input lies in it need no staging copy.
    ///
    /// # Collective
    /// Every rank, each with its own buffer of the same size, in the same order.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the buffer cannot be exported or a peer's cannot be opened (every
    /// rank then fails), [`Error::Mismatch`] when ranks pass different sizes.
    pub fn register_buffer<C: mpi::traits::Communicator>(&mut self, comm: &C, ptr: u64, bytes: usize) -> Result<()> {
        let exported = ipc::export(&self.ctx, ptr).and_then(|(h, off)| {
            if off != 0 {
                Err(Error::invalid("register_buffer", "pass the start of an allocation"))
            } else {
                Ok(h)
            }
        });
        let mut mine = agree(comm, exported, "register_buffer")?.0.to_vec();
        mine.extend_from_slice(&(bytes as u64).to_le_bytes());
        let all = crate::bootstrap::all_gather_bytes(comm, &mine);
        if let Some((r, _)) = all.iter().enumerate().find(|(_, b)| b[IPC_HANDLE_BYTES..] != mine[IPC_HANDLE_BYTES..]) {
            return Err(Error::Mismatch {
                op: "register_buffer",
                detail: format!("rank {r} registers a buffer of another size than rank {}", self.rank),
            });
        }
        let mut bases = [0u64; protocol::MAX_RANKS];
        let opened = (|| -> Result<()> {
            for (r, blob) in all.iter().enumerate() {
                bases[r] = if r == self.rank {
                    ptr
                } else {
                    self.peers.open(&IpcHandle(blob[..IPC_HANDLE_BYTES].try_into().unwrap()))?
                };
            }
            Ok(())
        })();
        agree(comm, opened, "register_buffer: opening peers' handles")?;
        self.registered.push(Registered { base: ptr, bytes, bases, rows: HashMap::new() });
        Ok(())
    }

    /// The rank-data row for an input at `ptr` of `bytes` inside a registered buffer, made on
    /// first use of its offset (ranks use the same offsets: the calls are collective).
    fn registered_row(&mut self, ptr: u64, bytes: usize) -> Result<Option<usize>> {
        let Some(i) =
            self.registered.iter().position(|r| ptr >= r.base && ptr + bytes as u64 <= r.base + r.bytes as u64)
        else {
            return Ok(None);
        };
        let off = ptr - self.registered[i].base;
        if let Some(&row) = self.registered[i].rows.get(&off) {
            return Ok(Some(row));
        }
        let row = self.reserve_row()?;
        let mut ptrs = [0u64; protocol::MAX_RANKS];
        for (r, p) in ptrs.iter_mut().enumerate().take(self.world) {
            *p = self.registered[i].bases[r] + off;
        }
        self.write_row(row, &ptrs)?;
        self.registered[i].rows.insert(off, row);
        Ok(Some(row))
    }

    /// True when `ptr` lies in a registered buffer.
    pub fn is_registered(&self, ptr: u64, bytes: usize) -> bool {
        self.registered.iter().any(|r| ptr >= r.base && ptr + bytes as u64 <= r.base + r.bytes as u64)
    }

    /// Sum `len` elements of `dtype` at `input` over all ranks into `output` (may equal
    /// `input`), with `kernel`, on `stream`.
    ///
    /// Outside stream capture the call waits for the kernel and reports a peer that never
    /// arrived as [`Error::PeerTimeout`]. While `stream` is capturing, the call is recorded:
    /// the kernel gets a reserved rank-data row, filled later by
    /// [`CustomAllreduce::register_graph_buffers`]; errors of replays are read by
    /// [`CustomAllreduce::check_error`].
    ///
    /// # Safety
    /// `input` and `output` must be device memory of this context valid for `len` elements of
    /// `dtype`, not written by other work while the call (or a replay of its capture) runs.
    ///
    /// # Collective
    /// Every rank, same `len`, `dtype` and `kernel`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for pointers not 16-byte aligned, an unregistered input in
    /// [`Mode::Registered`], or a staged / two-shot message over `max_bytes`;
    /// [`Error::Unsupported`] for f64; [`Error::PeerTimeout`]; [`Error::Mismatch`] when a peer
    /// made another call (length, dtype or algorithm), found by the kernels' call tags;
    /// [`Error::Cuda`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_reduce(
        &mut self,
        stream: &Arc<CudaStream>,
        kernel: Kernel,
        dtype: DType,
        input: u64,
        output: u64,
        len: usize,
        mode: Mode,
    ) -> Result<()> {
        const OP: &str = "custom all_reduce";
        let name = crate::cuda::check_launch(OP, "custom allreduce", kernel_name(kernel, dtype), dtype, input, output)?;
        let bytes = len * dtype.size();
        let needs_staging_room = mode == Mode::Staged || kernel == Kernel::TwoShot;
        if needs_staging_room && bytes > self.max_bytes {
            return Err(Error::invalid(
                OP,
                format!(
                    "{bytes} bytes exceed the {} bytes of the staging/scratch buffers (raise TPCOMM_CUSTOM_MAX_BYTES)",
                    self.max_bytes
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        // One-shot in place would overwrite our input while peers still read it: stage it.
        let stage = mode == Mode::Staged || (kernel == Kernel::OneShot && input == output);
        if stage && bytes > self.max_bytes {
            return Err(Error::invalid(
                OP,
                format!("in-place one-shot stages its input: {bytes} bytes exceed {} bytes", self.max_bytes),
            ));
        }
        let capturing = crate::cuda::is_capturing(stream)?;
        let row = if capturing {
            let local = if stage { self.staging.ptr() } else { input };
            let row = self.reserve_row()?;
            self.graph_pending.push((local, row));
            row
        } else if stage {
            0
        } else {
            match self.registered_row(input, bytes)? {
                Some(row) => row,
                None => {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "input {input:#x} ({bytes} bytes) is not in a registered buffer; allocate it with \
                             alloc_shared or use the staged mode"
                        ),
                    ))
                }
            }
        };
        if stage {
            // SAFETY: both ranges are device memory of `bytes` bytes (caller's contract and
            // bytes <= staging size checked above).
            unsafe { cudarc::driver::result::memcpy_dtod_async(self.staging.ptr(), input, bytes, stream.cu_stream()) }
                .map_err(cuda("cuMemcpyDtoDAsync(staging)"))?;
        }
        let nvec = bytes / protocol::VEC_BYTES;
        let work = match kernel {
            Kernel::OneShot => nvec,
            Kernel::TwoShot => nvec.div_ceil(self.world),
        };
        let blocks = grid_blocks(work, self.max_blocks);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (protocol::THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = self.funcs.get(&(kernel, dtype)).ok_or_else(|| Error::Internal(format!("{name} not loaded")))?;
        let rd = self.rank_data.ptr() + (row * protocol::RANK_DATA_ROW_BYTES) as u64;
        let rank = self.rank as i32;
        let count = len as u64;
        let timeout_ns = crate::cuda::timeout_ns(self.timeout);
        let err = self.err.device_ptr();
        let tag = protocol::call_tag(count, dtype.code(), kernel as u32);
        let mut launch = stream.launch_builder(func);
        launch.arg(&rd).arg(&self.sigs).arg(&self.scratch_ptrs).arg(&output).arg(&rank).arg(&count);
        launch.arg(&timeout_ns).arg(&err).arg(&tag);
        // SAFETY: the arguments match `(const Ptrs* rd, Ptrs sigs, Ptrs scratch, char* out, int rank,
        // u64 count, u64 timeout_ns, u64* err, u32 tag)` in kernels/custom_allreduce.cu; `rd` points to a
        // row of the rank-data table, `sigs`/`scratch_ptrs` are live IPC mappings, `output` is
        // valid for `len` elements (caller), `err` is the mapped host word.
        unsafe { launch.launch(cfg) }.map_err(cuda("cuLaunchKernel(custom allreduce)"))?;
        if capturing {
            return Ok(());
        }
        stream.synchronize().map_err(cuda("cuStreamSynchronize(custom allreduce)"))?;
        self.check_error()
    }

    /// Report a barrier failure recorded by any kernel since the last check. Call after
    /// synchronising with the stream that ran them (for example after replaying a captured
    /// graph).
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] naming the peer (rank in this group) that did not arrive;
    /// [`Error::Mismatch`] naming a peer that made another call (length, dtype or algorithm).
    pub fn check_error(&self) -> Result<()> {
        let word = self.err.get();
        match protocol::decode_error(word) {
            None => Ok(()),
            Some(t) if t.kind == protocol::BarrierErrorKind::Mismatch => Err(Error::Mismatch {
                op: "custom all_reduce",
                detail: format!(
                    "rank {} called with another length, dtype or algorithm than rank {} (seen at barrier {})",
                    t.peer, self.rank, t.barrier
                ),
            }),
            Some(t) => Err(Error::PeerTimeout {
                op: match t.barrier {
                    protocol::BARRIER_START => "custom allreduce: start barrier",
                    protocol::BARRIER_MID => "custom allreduce: two-shot middle barrier",
                    _ => "custom allreduce: end barrier",
                },
                peer: Some(t.peer),
                waited: self.timeout,
            }),
        }
    }

    /// Forget the calls captured since the last graph registration (their rows stay reserved
    /// and unused); for a capture that failed.
    pub fn discard_graph_pending(&mut self) {
        self.graph_pending.clear();
    }

    /// Calls captured since the last graph registration.
    pub fn graph_pending(&self) -> usize {
        self.graph_pending.len()
    }

    /// The IPC handle and offset of the buffer each captured call reads on this rank, in
    /// capture order (the seed's `get_graph_buffer_ipc_meta`).
    ///
    /// # Errors
    /// [`Error::Cuda`] when a buffer cannot be exported (it does not come from `cuMemAlloc`).
    pub fn graph_buffer_ipc_meta(&self) -> Result<GraphMeta> {
        let mut meta = GraphMeta::default();
        for &(ptr, _) in &self.graph_pending {
            let (h, off) = ipc::export(&self.ctx, ptr)?;
            meta.handles.push(h);
            meta.offsets.push(off);
        }
        Ok(meta)
    }

    /// Fill the reserved rows of the captured calls from every rank's [`GraphMeta`]
    /// (`all[r]` from rank `r`), the seed's `register_graph_buffers`.
    ///
    /// # Errors
    /// [`Error::Mismatch`] when ranks captured different numbers of calls (the rows stay
    /// unfilled and the graph must not be replayed); [`Error::Cuda`] when a handle cannot be
    /// opened.
    pub fn register_graph_buffers(&mut self, all: &[GraphMeta]) -> Result<()> {
        let n = self.graph_pending.len();
        if all.len() != self.world {
            return Err(Error::Internal(format!("{} graph metadata for {} ranks", all.len(), self.world)));
        }
        if let Some((r, m)) = all.iter().enumerate().find(|(_, m)| m.handles.len() != n || m.offsets.len() != n) {
            return Err(Error::Mismatch {
                op: "register_graph_buffers",
                detail: format!(
                    "rank {r} captured {} allreduce calls but rank {} captured {n}",
                    m.handles.len(),
                    self.rank
                ),
            });
        }
        let pending = std::mem::take(&mut self.graph_pending);
        for (i, &(local, row)) in pending.iter().enumerate() {
            let mut ptrs = [0u64; protocol::MAX_RANKS];
            for (r, meta) in all.iter().enumerate() {
                ptrs[r] = if r == self.rank { local } else { self.peers.open(&meta.handles[i])? + meta.offsets[i] };
            }
            self.write_row(row, &ptrs)?;
        }
        Ok(())
    }

    /// Gather every rank's [`GraphMeta`] over `comm` and register them.
    ///
    /// # Collective
    /// Every rank, after capturing the same calls.
    ///
    /// # Errors
    /// As [`CustomAllreduce::register_graph_buffers`]; every rank fails if one does.
    pub fn exchange_graph_buffers<C: mpi::traits::Communicator>(&mut self, comm: &C) -> Result<()> {
        let meta = self.graph_buffer_ipc_meta();
        let meta = agree(comm, meta, "graph_buffer_ipc_meta").inspect_err(|_| self.graph_pending.clear())?;
        let all = crate::bootstrap::all_gather_bytes(comm, &meta.to_bytes());
        let metas = all.iter().map(|b| GraphMeta::from_bytes(b)).collect::<Result<Vec<_>>>();
        let done = metas.and_then(|m| self.register_graph_buffers(&m));
        if done.is_err() {
            self.graph_pending.clear();
        }
        agree(comm, done, "register_graph_buffers")
    }
}

/// The fallible part of [`CustomAllreduce::new`] before any exchange.
type Prepared = (HashMap<(Kernel, DType), CudaFunction>, usize, IpcBuffer, IpcBuffer, IpcBuffer, bool);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_vector_once() {
        for world in 1..=8 {
            for nvec in [0, 1, 7, 8, 9, 1000, 1003] {
                let mut next = 0;
                for r in 0..world {
                    let s = shard(nvec, world, r);
                    assert_eq!(s.start, next);
                    assert!(s.len() <= nvec / world + 1);
                    next = s.end;
                }
                assert_eq!(next, nvec);
            }
        }
    }

    #[test]
    fn grid_is_capped_and_never_empty() {
        assert_eq!(grid_blocks(0, 36), 1);
        assert_eq!(grid_blocks(513, 36), 2);
        assert_eq!(grid_blocks(1 << 30, 36), 36);
        assert_eq!(grid_blocks(1 << 30, 0), 1);
    }

    #[test]
    fn graph_meta_round_trips() {
        let m = GraphMeta { handles: vec![IpcHandle([3; 64]), IpcHandle([9; 64])], offsets: vec![0, 4096] };
        assert_eq!(GraphMeta::from_bytes(&m.to_bytes()).unwrap(), m);
        assert!(GraphMeta::from_bytes(&[1, 2, 3]).is_err());
    }
}
