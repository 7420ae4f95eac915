//! Custom allreduce over CUDA IPC: one-shot and two-shot kernels (`kernels/custom_allreduce.cu`).
//!
//! The seed's interface, mapped:
//!
//! | seed | here |
//! |---|---|
//! | `init_custom_ar(ipc_tensors, rank_data, rank, full_nvlink)` | [`CustomAllreduce::new`] (allocates and exchanges its IPC buffers itself) |
//! | `all_reduce(fa, inp, out, reg_buffer, reg_buffer_sz_bytes)` | `enqueue` (staged through the staging buffer unless the input is registered or captured in place) |
//! | `dispose(fa)` | `Drop` |
//! | `meta_size()` | [`meta_size`] |
//! | `register_buffer(fa, fake_ipc_ptrs)` | `register_buffer` |
//! | `get_graph_buffer_ipc_meta(fa)` + `register_graph_buffers(fa, handles, offsets)` | `graph_begin` / `graph_end` |
//!
//! ## Memory every rank shares (CUDA IPC, from `cuMemAlloc`)
//! - **signal** ([`meta_size`] bytes): barrier mailboxes and counters, zeroed and barriered
//!   before the first kernel.
//! - **scratch** (`max_bytes`): two-shot's reduced shards; element `k` always lives at byte
//!   `k * size_of::<T>()`, whatever the message size or grid.
//! - **staging** (`max_bytes`): unregistered inputs are copied here first.
//!
//! ## The rank-data table (device memory, local; see `rank_data.rs`)
//! Row 0 is the staging buffers; each registered buffer has a row, and calls at any offset into
//! it pass the offset beside the row; each graph registration has a range of rows, one per
//! distinct address its captured calls read, written in one copy when the registration ends.
//! Every kernel checks that its row holds its own input at its own rank, so a call captured
//! outside a registration, or replayed after its rows were freed, fails instead of reading
//! whatever a stale row names.
//!
//! Preconditions (as for every collective): all ranks make the same calls in the same order with
//! the same length, dtype and algorithm, and calls on one instance are serialised. Ranks must
//! also lay a call out alike (registered or staged input, in place or not, the same offsets into
//! registered buffers): a call's tag covers that, so a rank that differs gets `Error::Mismatch`
//! on every rank before any data moves.

use super::peer_group::{check_world, export_all, kernel_error, share, KernelWords};
use super::rank_data::{RowArena, ROWS};
use super::{Call, DeviceBackend, RegId};
use crate::algo::Algo;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange::{agree, all_gather_bytes, barrier};
use crate::runtime::ipc::{self, IpcBuffer, IpcHandle, PeerMappings};
use crate::runtime::{kernels, protocol, Context, Function, HostWord};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of one rank's signal area (the seed's `meta_size()`).
pub(crate) fn meta_size() -> usize {
    protocol::SIGNAL_BYTES
}

/// Default block limit per launch of the plain kernels, in blocks of [`protocol::AR_THREADS`]
/// (the threads of the seed's 36 blocks of 512 on H100), before the shared-device cap.
pub(crate) const DEFAULT_MAX_BLOCKS: usize = 72;

/// Block limit of the fused kernels (one-shot or two-shot + RMSNorm), whose blocks have
/// [`protocol::THREADS`] threads (one block per row), before each kernel's shared-device cap.
/// 64 against 36 (the seed's grid) on one H200 under MPS, bf16, graphs (bench/RESULTS.md, "Fused
/// two-shot"): the fused one-shot's blocks take fewer rows each, 2 ranks 64 tokens of 4096 5.86 ->
/// 4.65 us, 4 ranks 128 tokens 13.02 -> 9.12; fewer rows than 36 unchanged. The shared device's
/// cap is below 64 for the fused kernels at 5-8 ranks.
const NORM_MAX_BLOCKS: usize = 64;

/// Threads per block of `kernel`'s launches.
fn block_threads(kernel: Kernel) -> usize {
    match kernel {
        Kernel::OneShotNorm | Kernel::TwoShotNorm => protocol::THREADS,
        Kernel::OneShot | Kernel::TwoShot | Kernel::TwoShotDirect => protocol::AR_THREADS,
    }
}

/// Without `TPCOMM_CUSTOM_MAX_BLOCKS`, calls of at least this many bytes may use up to
/// [`protocol::MAX_BLOCKS`] blocks (within the shared-device cap). Measured on one H200 under
/// MPS with 64 blocks of 512 threads against 36 (bench/RESULTS.md, "Late PDL release"; the same
/// threads as 128 and 72 blocks of [`protocol::AR_THREADS`] now): one-shot wins from
/// 2 MiB (2 ranks 16 MiB 43.93 -> 32.52 us; 512 KiB loses, 4.74 -> 5.19). Since the rows live
/// in registers (bench/RESULTS.md, "Large grids for both two-shots"; `TPCOMM_CUSTOM_MAX_BLOCKS`
/// 128 against the default grid, graphs): the scratch two-shot from 4 MiB (out of place 4 ranks
/// 14.64 -> 12.83 us, 8 ranks 32.43 -> 30.74; 2 MiB loses at 8 ranks, 15.99 -> 16.80), the direct
/// two-shot from 8 MiB (in place 4 ranks 8 MiB 16.88 -> 16.18, 16 MiB 45.64 -> 40.14, 32 MiB
/// 84.81 -> 74.40; 8 ranks level at 1-16 MiB, 76.01 -> 76.33 at 16 MiB).
fn large_grid_bytes(kernel: Kernel) -> usize {
    match kernel {
        Kernel::OneShot => 2 << 20,
        Kernel::TwoShot => 4 << 20,
        Kernel::TwoShotDirect => 8 << 20,
        Kernel::OneShotNorm | Kernel::TwoShotNorm => usize::MAX,
    }
}

/// Without `TPCOMM_CUSTOM_MAX_BLOCKS`, both two-shots below [`large_grid_bytes`] use at most
/// this many blocks at 3-8 ranks, and the one-shot at 4-8 ranks ([`small_grid_kernel`]): fewer
/// threads, each taking several vectors, win there. Measured on one H200 under MPS in blocks of
/// 512 threads, 16 against more (bench/RESULTS.md; 32 blocks of 256 now, the same threads,
/// which won against 16 of 512 in "Blocks of 256 threads"): the direct two-shot in place
/// ("16-byte loads ...", item 3) 8 ranks
/// 2 MiB 19.83 us with 33 blocks, 15.21 with 16, 15.18 with 8; 4 MiB 31.28, 26.48, 27.11;
/// 8 MiB 50.58, 50.36, 55.87; 4 ranks with 16 blocks against 36: 2 MiB 10.70 -> 9.24, 4 MiB
/// 14.21 -> 12.22, 8 MiB 24.77 -> 23.36. The scratch two-shot out of place ("All-gather loads
/// in flight ...", item 2) with 16 blocks against 36: 8 ranks 2 MiB 23.8 -> 20.1, 4 MiB 34.8 ->
/// 33.4; 4 ranks 2 MiB 12.1 -> 11.0, 4 MiB 20.5 -> 18.9; 24 blocks lose at 8 ranks. The
/// one-shot with 16 blocks against 36 ("One-shot on 16 blocks ...", item 1): 4 ranks 256 KiB
/// 5.89 -> 5.05, 512 KiB 6.57 -> 5.91, 1 MiB 7.83 -> 7.43; at 3 ranks 1 MiB lost (6.29 ->
/// 6.74), so 3 ranks keep the default grid for it. Not measured at 2 ranks, which keep it too.
const SMALL_GRID_MAX_BLOCKS: usize = 32;

/// Whether `kernel` at `world` ranks takes [`SMALL_GRID_MAX_BLOCKS`] below the large size.
fn small_grid_kernel(kernel: Kernel, world: usize) -> bool {
    match kernel {
        Kernel::TwoShot | Kernel::TwoShotDirect => world >= 3,
        Kernel::OneShot => world >= 4,
        Kernel::OneShotNorm | Kernel::TwoShotNorm => false,
    }
}

/// The kernels' algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    /// Every rank reads all inputs.
    OneShot,
    /// One-shot with residual add + RMSNorm as its epilogue (calls carrying a norm).
    OneShotNorm,
    /// Reduce-scatter into the scratch buffers, then all-gather from them.
    TwoShot,
    /// Two-shot whose owner of each shard stores it straight into every rank's output (no
    /// scratch): serves [`Algo::TwoShot`] when every rank's input and output are named in rows.
    TwoShotDirect,
    /// The direct two-shot by pieces of rows with residual add + RMSNorm as its epilogue (calls
    /// carrying a norm whose input and norm_out every rank reaches).
    TwoShotNorm,
}

impl Kernel {
    /// Every kernel, in the order of their index into per-kernel tables (`kernel as usize`).
    const ALL: [Kernel; 5] =
        [Kernel::OneShot, Kernel::OneShotNorm, Kernel::TwoShot, Kernel::TwoShotDirect, Kernel::TwoShotNorm];

    fn of(algo: Algo) -> Result<Self> {
        match algo {
            Algo::OneShot => Ok(Kernel::OneShot),
            Algo::TwoShot => Ok(Kernel::TwoShot),
            other => Err(Error::Internal(format!("the custom backend was asked to run {other}"))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::OneShot => "oneshot",
            Kernel::OneShotNorm => "oneshot_norm",
            Kernel::TwoShot => "twoshot",
            Kernel::TwoShotDirect => "twoshot_direct",
            Kernel::TwoShotNorm => "twoshot_norm",
        }
    }
}

/// Where the kernels write the group's fault word: its device address and the value that
/// raises it for this rank.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FaultTarget {
    pub word: u64,
    pub raise: u64,
}

/// Settings of a [`CustomAllreduce`].
#[derive(Debug, Clone)]
pub(crate) struct CustomOptions {
    /// Size of the staging and scratch buffers: the largest staged or two-shot message.
    pub max_bytes: usize,
    /// Spin limit of every barrier, and of every set-up exchange.
    pub timeout: Duration,
    /// Ranks whose kernels share this rank's GPU (1 = own GPU); caps the grid so all of their
    /// blocks fit on the device at once.
    pub ranks_per_device: usize,
    /// Kernel cache directory (`None`: compile every time).
    pub cache_dir: Option<PathBuf>,
    pub fault: FaultTarget,
    /// Launch with programmatic dependent launch (`TPCOMM_PDL`).
    pub pdl: bool,
    /// Most blocks of one launch (`TPCOMM_CUSTOM_MAX_BLOCKS`), before the shared-device cap;
    /// `None`: [`DEFAULT_MAX_BLOCKS`], more for large calls ([`large_grid_bytes`]) and fewer for
    /// some kernels at 3-8 ranks ([`SMALL_GRID_MAX_BLOCKS`]).
    pub max_blocks: Option<usize>,
}

/// A registered buffer: its local range, its row, and the peers' handles opened for it.
struct Registered {
    id: u64,
    base: u64,
    bytes: usize,
    row: u32,
    handles: Vec<IpcHandle>,
}

/// The state of a capture under way: its reserved rows and, per distinct address read, the row
/// given and the address's export.
struct Capture {
    reg: RegId,
    rows: Range<u32>,
    by_addr: HashMap<u64, u32>,
    /// Per row used (in order): the local address and its export.
    used: Vec<(u64, (IpcHandle, u64))>,
    /// Per captured call: its input's row and its outputs' row (`u32::MAX`: none), relative to
    /// `rows.start`.
    calls: Vec<(u32, u32)>,
}

/// One rank's side of the custom allreduce.
pub(crate) struct CustomAllreduce {
    comm: crate::exchange::Comm,
    ctx: Arc<Context>,
    rank: usize,
    world: usize,
    funcs: HashMap<(Kernel, DType), Function>,
    max_blocks: usize,
    /// The fused kernels' grid limit ([`NORM_MAX_BLOCKS`]; `max_blocks` when the user set it),
    /// within the fused one-shot's cap (each launch also takes its own kernel's cap).
    norm_max_blocks: usize,
    /// The grid limit of large calls (`max_blocks` when the user set it).
    large_blocks: usize,
    /// The grid limit below the large size of the kernels [`small_grid_kernel`] names
    /// ([`SMALL_GRID_MAX_BLOCKS`]; `max_blocks` when the user set it).
    small_grid_blocks: usize,
    /// Each kernel's shared-device cap (`kernel as usize`), from its own occupancy: the direct
    /// two-shot's register budget gives it fewer blocks per SM (kernels/custom_allreduce.cu,
    /// `BLOCKS_PER_SM`).
    caps: [usize; Kernel::ALL.len()],
    max_bytes: usize,
    timeout: Duration,
    sigs: [u64; protocol::MAX_RANKS],
    scratch_ptrs: [u64; protocol::MAX_RANKS],
    staging: IpcBuffer,
    rank_data: IpcBuffer,
    rows: RowArena,
    registered: Vec<Registered>,
    graphs: HashMap<RegId, Range<u32>>,
    capture: Option<Capture>,
    err: HostWord,
    fault: FaultTarget,
    pdl: bool,
    kernels_from_disk: bool,
    // Dropped last-but-one: peers' mappings close before our own buffers are freed.
    peers: PeerMappings,
    _signal: IpcBuffer,
    _scratch: IpcBuffer,
}

/// The fallible part of [`CustomAllreduce::new`] before any exchange.
struct Prepared {
    funcs: HashMap<(Kernel, DType), Function>,
    max_blocks: usize,
    norm_max_blocks: usize,
    large_blocks: usize,
    small_grid_blocks: usize,
    caps: [usize; Kernel::ALL.len()],
    signal: IpcBuffer,
    scratch: IpcBuffer,
    staging: IpcBuffer,
    rank_data: IpcBuffer,
    from_disk: bool,
}

/// Blocks of `threads` for `work_vecs` vectors of work per rank, within `max_blocks`.
pub(crate) fn grid_blocks(work_vecs: usize, threads: usize, max_blocks: usize) -> usize {
    work_vecs.div_ceil(threads).clamp(1, max_blocks.max(1))
}

impl CustomAllreduce {
    /// Allocate this rank's signal, scratch, staging and rank-data buffers, exchange their IPC
    /// handles with the other ranks of `comm` (all on this node), compile or load the kernels,
    /// and wait (bounded) until every rank has zeroed its signal area.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same options; `comm` spans at most
    /// [`protocol::MAX_RANKS`] ranks.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for too many ranks, a GPU older than sm_80, or a shared device
    /// that cannot hold every rank's blocks at once; [`Error::Cuda`] / [`Error::Compile`] from
    /// allocation, IPC or compilation. An error on one rank makes every rank return an error.
    pub(crate) fn new(comm: &SimpleCommunicator, ctx: &Arc<Context>, opts: &CustomOptions) -> Result<Self> {
        const STEP: &str = "custom allreduce set-up";
        let comm = crate::exchange::Comm::new(comm.duplicate());
        let world = comm.size() as usize;
        let rank = comm.rank() as usize;
        check_world(world, "custom allreduce")?;
        let p = agree(&*comm, Self::prepare(ctx, world, opts), opts.timeout, STEP)?;
        let local = [p.signal.ptr(), p.scratch.ptr(), p.staging.ptr()];
        let mut peers = PeerMappings::new(ctx);
        let shared = share(&*comm, opts.timeout, &local, export_all(ctx, &local), &mut peers, STEP)?;
        let this = CustomAllreduce {
            ctx: ctx.clone(),
            rank,
            world,
            funcs: p.funcs,
            max_blocks: p.max_blocks,
            norm_max_blocks: p.norm_max_blocks,
            large_blocks: p.large_blocks,
            small_grid_blocks: p.small_grid_blocks,
            caps: p.caps,
            max_bytes: opts.max_bytes,
            timeout: opts.timeout,
            sigs: shared.addrs[0],
            scratch_ptrs: shared.addrs[1],
            staging: p.staging,
            rank_data: p.rank_data,
            rows: RowArena::new(1..ROWS),
            registered: Vec::new(),
            graphs: HashMap::new(),
            capture: None,
            err: HostWord::new()?,
            fault: opts.fault,
            pdl: opts.pdl,
            kernels_from_disk: p.from_disk,
            peers,
            _signal: p.signal,
            _scratch: p.scratch,
            comm,
        };
        let written = this.write_rows(0, &shared.addrs[2..3]);
        agree(&*this.comm, written, opts.timeout, STEP)?;
        // Every signal area is zero (prepare() synchronised) before any rank launches a kernel.
        barrier(&*this.comm, opts.timeout, STEP)?;
        Ok(this)
    }

    fn prepare(ctx: &Arc<Context>, world: usize, opts: &CustomOptions) -> Result<Prepared> {
        let (funcs, from_disk) = kernels::CUSTOM.load(
            ctx,
            world,
            opts.cache_dir.clone(),
            &Kernel::ALL,
            Kernel::name,
            "the custom allreduce",
        )?;
        // A call's grid per rank is what must fit on the shared device (kernels/common.cuh, PDL):
        // each kernel's cap comes from its own occupancy (block size and register budget), over
        // its dtypes.
        let mut caps = [0; Kernel::ALL.len()];
        for kernel in Kernel::ALL {
            caps[kernel as usize] = crate::runtime::co_resident_blocks(
                ctx,
                funcs.iter().filter(|((k, _), _)| *k == kernel).map(|(_, f)| f),
                block_threads(kernel),
                opts.ranks_per_device,
                "custom allreduce",
            )?;
        }
        let cap = caps[Kernel::OneShot as usize].min(caps[Kernel::TwoShot as usize]);
        let norm_cap = caps[Kernel::OneShotNorm as usize];
        let max_blocks = opts.max_blocks.unwrap_or(DEFAULT_MAX_BLOCKS).min(protocol::MAX_BLOCKS).min(cap);
        let norm_max_blocks = opts.max_blocks.unwrap_or(NORM_MAX_BLOCKS).min(protocol::MAX_BLOCKS).min(norm_cap);
        let large_blocks = if opts.max_blocks.is_some() { max_blocks } else { protocol::MAX_BLOCKS.min(cap) };
        let small_grid_blocks =
            if opts.max_blocks.is_none() { SMALL_GRID_MAX_BLOCKS.min(max_blocks) } else { max_blocks };
        let signal = IpcBuffer::alloc_signal(ctx, meta_size())?;
        signal.zero()?;
        let scratch = IpcBuffer::alloc(ctx, opts.max_bytes)?;
        let staging = IpcBuffer::alloc(ctx, opts.max_bytes)?;
        // Zero rows never name an input, so a kernel handed an unfilled row fails its check.
        let rank_data = IpcBuffer::alloc(ctx, ROWS as usize * protocol::RANK_DATA_ROW_BYTES)?;
        rank_data.zero()?;
        Ok(Prepared {
            funcs,
            max_blocks,
            norm_max_blocks,
            large_blocks,
            small_grid_blocks,
            caps,
            signal,
            scratch,
            staging,
            rank_data,
            from_disk,
        })
    }

    /// Most blocks of one launch (after the shared-device cap).
    pub(crate) fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Most blocks of a large call's launch ([`large_grid_bytes`]; after the shared-device cap).
    pub(crate) fn large_blocks(&self) -> usize {
        self.large_blocks
    }

    /// Most blocks below the large size of the kernels [`small_grid_kernel`] names
    /// ([`SMALL_GRID_MAX_BLOCKS`]; after the shared-device cap); `None` where no kernel takes
    /// the small grid at this world size.
    pub(crate) fn small_grid_blocks(&self) -> Option<usize> {
        let used = [Kernel::OneShot, Kernel::TwoShot, Kernel::TwoShotDirect]
            .into_iter()
            .any(|k| small_grid_kernel(k, self.world));
        used.then_some(self.small_grid_blocks)
    }

    /// Most blocks of a direct two-shot launch where its own shared-device cap is below the
    /// other limits (its register budget halves its blocks per SM); `None` where it is not.
    pub(crate) fn direct_cap_below_limits(&self) -> Option<usize> {
        // At the largest sizes, where its grid is widest (large_grid_bytes).
        let cap = self.caps[Kernel::TwoShotDirect as usize];
        (cap < self.grid_limit(Kernel::TwoShotDirect, usize::MAX)).then_some(cap)
    }

    /// The most blocks of a `kernel` launch for a call of `bytes`, before the kernel's own
    /// shared-device cap.
    fn grid_limit(&self, kernel: Kernel, bytes: usize) -> usize {
        match kernel {
            _ if bytes >= large_grid_bytes(kernel) => self.large_blocks,
            _ if small_grid_kernel(kernel, self.world) => self.small_grid_blocks,
            _ => self.max_blocks,
        }
    }

    /// True when the kernels' CUBIN came from the disk cache rather than NVRTC.
    pub(crate) fn kernels_from_disk_cache(&self) -> bool {
        self.kernels_from_disk
    }

    /// Write `rows` consecutive rows from `first`, in one synchronous copy.
    fn write_rows(&self, first: u32, rows: &[[u64; protocol::MAX_RANKS]]) -> Result<()> {
        let bytes: Vec<u8> = rows.iter().flat_map(|r| r.iter().flat_map(|p| p.to_le_bytes())).collect();
        self.rank_data.write_at(first as usize * protocol::RANK_DATA_ROW_BYTES, &bytes)
    }

    /// Free quarantined rows once the device has finished everything it was given (zeroing
    /// them, so a stale kernel handed one fails its row check).
    fn recycle_rows(&mut self) -> Result<()> {
        if !self.rows.has_quarantine() {
            return Ok(());
        }
        crate::runtime::synchronize(&self.ctx, "synchronize (recycling rank-data rows)")?;
        self.rows.recycle_with(|r| {
            self.rank_data
                .zero_at(r.start as usize * protocol::RANK_DATA_ROW_BYTES, r.len() * protocol::RANK_DATA_ROW_BYTES)
        })
    }

    fn registered_at(&self, ptr: u64, bytes: usize) -> Option<&Registered> {
        self.registered.iter().find(|r| ptr >= r.base && ptr + bytes as u64 <= r.base + r.bytes as u64)
    }

    fn full_table() -> Error {
        Error::Unsupported {
            what: "another registered buffer or captured allreduce".into(),
            reason: format!(
                "the rank-data table is full ({ROWS} rows): drop graphs (their GraphRegistration) and buffers you no \
                 longer use"
            ),
        }
    }

    /// The row of a call captured under the current registration, reading `local`.
    fn capture_row(&mut self, reg: RegId, local: u64, staged: bool) -> Result<u32> {
        let ctx = self.ctx.clone();
        let staging = (self.staging.handle(), self.staging.ptr());
        let cap = match self.capture.as_mut() {
            Some(c) if c.reg == reg => c,
            _ => return Err(Error::Internal(format!("custom: a call captured for registration {reg} outside it"))),
        };
        let row = match cap.by_addr.get(&local) {
            Some(&row) => row,
            None => {
                let row = cap.rows.start + cap.used.len() as u32;
                if row >= cap.rows.end {
                    return Err(Self::full_table());
                }
                let export = if staged { Ok((staging.0?, local - staging.1)) } else { ipc::export(&ctx, local) }?;
                cap.by_addr.insert(local, row);
                cap.used.push((local, export));
                row
            }
        };
        Ok(row)
    }

    /// What a row is, in words every rank computes alike for the same call (row numbers
    /// themselves may differ between ranks): 0 for the staging row, the registration's id for a
    /// registered buffer, the row's place in the capture under way for a captured call.
    fn placement(&self, row: u32) -> u64 {
        const REGISTERED: u64 = 1 << 62;
        const CAPTURED: u64 = 2 << 62;
        if row == 0 {
            return 0;
        }
        if let Some(r) = self.registered.iter().find(|r| r.row == row) {
            return REGISTERED | r.id;
        }
        match &self.capture {
            Some(c) if c.rows.contains(&row) => CAPTURED | u64::from(row - c.rows.start),
            _ => CAPTURED | REGISTERED | u64::from(row),
        }
    }

    /// Record a captured call's rows, for the check that every rank captured the same calls.
    fn record_call(&mut self, rows: (u32, Option<u32>)) {
        if let Some(cap) = self.capture.as_mut() {
            let rel = |r: u32| r - cap.rows.start;
            cap.calls.push((rel(rows.0), rows.1.map_or(u32::MAX, rel)));
        }
    }

    /// The row naming every rank's output of a two-shot call, and the output's offset into the
    /// row's buffers, when there is one: the input's own row in place, the output's export in a
    /// capture, the output's registered buffer in an eager call. `None` sends the call through
    /// the scratch buffers. Every rank decides alike for the same calls on the same kind of
    /// memory; a rank that decides otherwise runs another kernel, whose tag differs, and every
    /// rank gets [`Error::Mismatch`] (in a capture already when the registration ends).
    fn output_row(&mut self, call: &Call, in_row: u32, in_offset: u64) -> Result<Option<(u32, u64)>> {
        if call.output == call.input {
            return Ok(Some((in_row, in_offset)));
        }
        match call.capture {
            Some(reg) => match ipc::export(&self.ctx, call.output) {
                Ok(_) => Ok(Some((self.capture_row(reg, call.output, false)?, 0))),
                Err(_) => Ok(None),
            },
            None => Ok(self.registered_at(call.output, call.bytes()).map(|r| (r.row, call.output - r.base))),
        }
    }
}

/// How the custom kernels' errors read.
const WORDS: KernelWords = KernelWords {
    op: "custom all_reduce",
    family: "custom allreduce",
    wait: |id| match id {
        protocol::BARRIER_START => "custom allreduce: start barrier",
        protocol::BARRIER_MID => "custom allreduce: two-shot middle barrier",
        _ => "custom allreduce: end barrier",
    },
};

impl DeviceBackend for CustomAllreduce {
    fn reads_in_place(&mut self, call: &Call) -> bool {
        let bytes = call.bytes();
        // What enqueue reads in place: a registered buffer, or in a capture an exportable one.
        let reachable = |ptr: u64| {
            self.registered_at(ptr, bytes).is_some() || (call.capture.is_some() && ipc::export(&self.ctx, ptr).is_ok())
        };
        reachable(call.input) && (call.output == call.input || reachable(call.output))
    }

    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()> {
        const OP: &str = "custom all_reduce";
        let kernel = match (Kernel::of(algo)?, call.norm) {
            (Kernel::OneShot, Some(_)) => Kernel::OneShotNorm,
            (Kernel::TwoShot, Some(_)) => Kernel::TwoShotNorm,
            (k, None) => k,
            (k, Some(_)) => return Err(Error::Internal(format!("the norm cannot be fused into {}", k.name()))),
        };
        let stream = call.stream.device()?;
        let dtype = call.dtype;
        if !self.funcs.contains_key(&(kernel, dtype)) {
            return Err(kernels::unsupported_dtype("custom allreduce", dtype));
        }
        let bytes = call.bytes();
        if call.len == 0 {
            return Ok(());
        }
        let registered = self.registered_at(call.input, bytes).map(|r| (r.row, r.base));
        if call.registered_only && registered.is_none() {
            return Err(Error::invalid(
                OP,
                format!(
                    "input {:#x} ({bytes} bytes) is not in a registered buffer; allocate it with alloc_shared or drop \
                     CallOptions::registered_only",
                    call.input
                ),
            ));
        }
        // In a capture, an input that can be exported is read in place by the replays; memory
        // from a stream-ordered pool cannot be, and is staged; eager calls read registered
        // inputs in place and stage the others.
        let unreadable = match call.capture {
            Some(_) => registered.is_none() && ipc::export(&self.ctx, call.input).is_err(),
            None => registered.is_none(),
        };
        // One-shot in place would overwrite our input while peers still read it: stage it. The
        // fused kernel instead writes its output after the end barrier (`late`) where each block
        // can hold its rows' norms that long.
        let in_place = call.input == call.output && matches!(kernel, Kernel::OneShot | Kernel::OneShotNorm);
        // The fused kernels' blocks own whole rows: one block per row, as many as the limit and
        // the kernel's own shared-device cap allow.
        let norm = call.norm.unwrap_or_default();
        let rows = call.len / norm.hidden.max(1);
        let norm_blocks = rows.clamp(1, self.norm_max_blocks.min(self.caps[kernel as usize]));
        let late = kernel == Kernel::OneShotNorm
            && in_place
            && !unreadable
            && rows.div_ceil(norm_blocks) <= protocol::NORM_LATE_ROWS;
        let stage = unreadable || (in_place && !late);
        let unreachable = || Error::Unsupported {
            what: "the fused two-shot allreduce + RMSNorm".into(),
            reason: "it writes every rank's norm_out: the input and norm_out must lie in buffers every peer reaches \
                     (alloc_shared, or a captured graph)"
                .into(),
        };
        if kernel == Kernel::TwoShotNorm && stage {
            return Err(unreachable());
        }
        let max_bytes = self.max_bytes;
        let too_big =
            || Error::invalid(OP, format!("{bytes} bytes exceed the {max_bytes} bytes of the staging/scratch buffers"));
        if stage && bytes > max_bytes {
            return Err(too_big());
        }
        let (row, in_offset, local_in) = match (call.capture, stage, registered) {
            (Some(reg), true, _) => (self.capture_row(reg, self.staging.ptr(), true)?, 0, self.staging.ptr()),
            (Some(reg), false, _) => (self.capture_row(reg, call.input, false)?, 0, call.input),
            (None, true, _) => (0, 0, self.staging.ptr()),
            (None, false, Some((row, base))) => (row, call.input - base, call.input),
            (None, false, None) => return Err(Error::Internal("custom: unstaged call without a row".into())),
        };
        // Two-shot stores the reduced shards straight into every rank's output when a row names
        // them all; a staged input's row names staging buffers, never the outputs.
        let direct = match kernel {
            Kernel::TwoShot | Kernel::TwoShotNorm if !stage => self.output_row(call, row, in_offset)?,
            _ => None,
        };
        if kernel == Kernel::TwoShotNorm && direct.is_none() {
            return Err(unreachable());
        }
        // Only the direct two-shot needs neither staging nor scratch: any size.
        if kernel == Kernel::TwoShot && direct.is_none() && bytes > max_bytes {
            return Err(too_big());
        }
        if call.capture.is_some() {
            self.record_call((row, direct.map(|d| d.0)));
        }
        let kernel = if kernel == Kernel::TwoShot && direct.is_some() { Kernel::TwoShotDirect } else { kernel };
        let (out_row, out_offset) = direct.unwrap_or((row, 0));
        if stage {
            // SAFETY: both ranges are device memory of `bytes` bytes (caller's contract, and
            // bytes <= staging size checked above); stream-ordered before the kernel.
            unsafe { call.stream.copy(self.staging.ptr(), call.input, bytes) }?;
        }
        let nvec = bytes / protocol::VEC_BYTES;
        let limit = self.grid_limit(kernel, bytes).min(self.caps[kernel as usize]);
        let threads = block_threads(kernel);
        let blocks = match kernel {
            Kernel::OneShot => grid_blocks(nvec, threads, limit),
            Kernel::OneShotNorm | Kernel::TwoShotNorm => norm_blocks,
            Kernel::TwoShot | Kernel::TwoShotDirect => grid_blocks(nvec.div_ceil(self.world), threads, limit),
        };
        let func =
            self.funcs.get(&(kernel, dtype)).ok_or_else(|| kernels::unsupported_dtype("custom allreduce", dtype))?;
        let row_ptr = |r: u32| self.rank_data.ptr() + (r as usize * protocol::RANK_DATA_ROW_BYTES) as u64;
        let rd = row_ptr(row);
        let rd_out = row_ptr(out_row);
        let rank = self.rank as i32;
        let count = call.len as u64;
        let timeout_ns = crate::runtime::timeout_ns(self.timeout);
        let err = self.err.device_ptr();
        // Peers read (and two-shot direct writes) this rank's buffers through their own rows at
        // their own offsets: rows and offsets are part of the call, so ranks that disagree (a
        // registered input on one rank and a staged one on another, in place here and out of
        // place there, other offsets) stop with a mismatch before touching any data.
        let hidden = norm.hidden as u64;
        let late_flag = i32::from(late);
        let tag = protocol::call_tag(
            count,
            dtype.code(),
            kernel as u32,
            &[self.placement(row), in_offset, self.placement(out_row), out_offset, hidden, u64::from(late)],
        );
        use crate::runtime::arg;
        let mut params = [
            arg(&rd),
            arg(&in_offset),
            arg(&local_in),
            arg(&rd_out),
            arg(&out_offset),
            arg(&self.sigs),
            arg(&self.scratch_ptrs),
            arg(&call.output),
            arg(&rank),
            arg(&count),
            arg(&timeout_ns),
            arg(&err),
            arg(&tag),
            arg(&self.fault.word),
            arg(&self.fault.raise),
            arg(&norm.residual),
            arg(&norm.residual_out),
            arg(&norm.weight),
            arg(&hidden),
            arg(&norm.eps),
            arg(&late_flag),
        ];
        // SAFETY: the arguments match `(const Ptrs* rd, u64 in_offset, const char* local_in, const Ptrs* rd_out,
        // u64 out_offset, Ptrs sigs, Ptrs scratch, char* out, int rank, u64 count, u64 timeout_ns, u64* err, u32 tag,
        // u64* fault_word, u64 fault_raise, const char* residual, char* residual_out, const char* weight,
        // u64 hidden, float eps, int late)` in kernels/custom_allreduce.cu (types as declared above; the norm's buffers are
        // the caller's, valid for the call, and read only by the fused kernel); `rd`
        // and `rd_out` point to rows of the rank-data table (the kernels check that they name `local_in` and `out`
        // before reading or writing any address in them),
        // `sigs` and `scratch_ptrs` are live IPC mappings, `output` is valid for `len` elements (caller),
        // `err` is the mapped host word and `fault.word` the mapped fault page.
        unsafe {
            crate::runtime::launch(func, blocks, threads, stream, &mut params, self.pdl, "kernel launch (custom)")
        }
    }

    fn poll(&mut self) -> Result<()> {
        kernel_error(self.err.get(), self.rank, self.timeout, &WORDS).map_or(Ok(()), Err)
    }

    fn register_buffer(&mut self, id: u64, ptr: u64, bytes: usize) -> Result<()> {
        const STEP: &str = "registering a shared buffer";
        let sizes = all_gather_bytes(&*self.comm, &(bytes as u64).to_le_bytes(), self.timeout, STEP)?;
        if let Some(r) = sizes.iter().position(|s| s[..] != (bytes as u64).to_le_bytes()) {
            return Err(Error::Mismatch {
                op: "alloc_shared",
                detail: format!("rank {r} of the node registers a buffer of another size than rank {}", self.rank),
            });
        }
        let exported = ipc::export(&self.ctx, ptr).and_then(|(h, off)| match off {
            0 => Ok(vec![(h, 0)]),
            _ => Err(Error::Internal("a registered buffer must start its allocation".into())),
        });
        let shared = share(&*self.comm, self.timeout, &[ptr], exported, &mut self.peers, STEP)?;
        let row = self.rows.alloc(1).ok_or_else(Self::full_table);
        let row = agree(&*self.comm, row, self.timeout, STEP)?;
        let written = self.write_rows(row.start, &shared.addrs);
        agree(&*self.comm, written, self.timeout, STEP)?;
        let handles = shared.handles.into_iter().next().unwrap_or_default();
        self.registered.push(Registered { id, base: ptr, bytes, row: row.start, handles });
        Ok(())
    }

    fn release_buffer(&mut self, id: u64) -> Result<()> {
        if let Some(i) = self.registered.iter().position(|r| r.id == id) {
            let r = self.registered.swap_remove(i);
            for h in &r.handles {
                self.peers.close(h);
            }
            self.rows.release(r.row..r.row + 1);
        }
        Ok(())
    }

    fn graph_begin(&mut self, reg: RegId) -> Result<()> {
        if self.capture.is_some() {
            return Err(Error::usage("GraphRegistration", "another registration is still capturing; finish it first"));
        }
        self.recycle_rows()?;
        let rows = self.rows.reserve_largest().ok_or_else(Self::full_table)?;
        self.capture = Some(Capture { reg, rows, by_addr: HashMap::new(), used: Vec::new(), calls: Vec::new() });
        Ok(())
    }

    fn graph_end(&mut self, reg: RegId) -> Result<()> {
        let cap = match self.capture.take() {
            Some(c) if c.reg == reg => c,
            other => {
                self.capture = other;
                return Err(Error::Internal(format!("custom: graph_end({reg}) without its graph_begin")));
            }
        };
        let used = cap.rows.start..cap.rows.start + cap.used.len() as u32;
        self.rows.give_back(used.end..cap.rows.end);
        let result = self.register_capture(&cap);
        match &result {
            Ok(()) => {
                self.graphs.insert(reg, used);
            }
            // The rows may be named by the captured graph (replays then fail their row check).
            Err(_) => self.rows.release(used),
        }
        result
    }

    fn graph_release(&mut self, reg: RegId) {
        // A registration given up before graph_end (its capture failed on some rank): its
        // reservation ends here, or every later registration would be refused. Calls captured
        // under it may name the rows, so they are quarantined like a dropped graph's.
        if self.capture.as_ref().is_some_and(|c| c.reg == reg) {
            if let Some(cap) = self.capture.take() {
                self.rows.release(cap.rows);
            }
        }
        if let Some(rows) = self.graphs.remove(&reg) {
            self.rows.release(rows);
        }
    }
}

impl CustomAllreduce {
    /// Exchange what the captured calls of `cap` read and write their rows.
    fn register_capture(&mut self, cap: &Capture) -> Result<()> {
        const STEP: &str = "registering a graph's buffers";
        // Every rank must have captured the same calls, and calls that share a row here must
        // share it everywhere (each row is written once, for one tuple of addresses).
        let mine: Vec<u8> = cap.calls.iter().flat_map(|&(i, o)| [i.to_le_bytes(), o.to_le_bytes()]).flatten().collect();
        let all = all_gather_bytes(&*self.comm, &mine, self.timeout, STEP)?;
        let differs = all.iter().enumerate().find(|(_, theirs)| **theirs != mine);
        let consistent = match differs {
            None => Ok(()),
            Some((r, theirs)) if theirs.len() != mine.len() => Err(Error::Mismatch {
                op: "GraphRegistration::finish",
                detail: format!(
                    "rank {r} of the node captured {} allreduce calls but rank {} captured {} (do not replay the graph)",
                    theirs.len() / 8,
                    self.rank,
                    mine.len() / 8
                ),
            }),
            Some((r, _)) => Err(Error::Mismatch {
                op: "GraphRegistration::finish",
                detail: format!(
                    "captured calls share a buffer on one rank but not on another, or write an output that can be \
                     shared on one rank but not on another (ranks {r} and {} of the node); give every call of a \
                     graph the same buffer layout on every rank",
                    self.rank
                ),
            }),
        };
        agree(&*self.comm, consistent, self.timeout, STEP)?;
        let local: Vec<u64> = cap.used.iter().map(|(p, _)| *p).collect();
        let exports: Vec<(IpcHandle, u64)> = cap.used.iter().map(|(_, e)| *e).collect();
        let shared = share(&*self.comm, self.timeout, &local, Ok(exports), &mut self.peers, STEP)?;
        let written = self.write_rows(cap.rows.start, &shared.addrs);
        agree(&*self.comm, written, self.timeout, STEP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_capped_and_never_empty() {
        assert_eq!(grid_blocks(0, 256, 72), 1);
        assert_eq!(grid_blocks(257, 256, 72), 2);
        assert_eq!(grid_blocks(513, 512, 36), 2);
        assert_eq!(grid_blocks(1 << 30, 256, 72), 72);
        assert_eq!(grid_blocks(1 << 30, 256, 0), 1);
    }
}
