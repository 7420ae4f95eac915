//! The [`Communicator`]: bootstraps over MPI, owns one object per backend, routes each call.

use crate::backend::host::HostAllreduce;
use crate::bootstrap::{all_gather_bytes, broadcast_bytes, Bootstrap};
use crate::config::Config;
use crate::dispatch::{Algo, DispatchTable, Memory, Request};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::hierarchy::CrossNode;
use crate::shm::ShmSegment;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Segments made by this process, so two communicators never pick the same name.
static SEGMENTS: AtomicUsize = AtomicUsize::new(0);

/// Allreduce among the ranks of an MPI communicator.
///
/// Built collectively by [`Communicator::new`]. Calls on one communicator are serialised: they
/// take an internal lock, and every rank must make the same collective calls in the same order.
/// Use one communicator per thread or stream that issues collectives concurrently.
///
/// A communicator holds MPI handles, so it is neither `Send` nor `Sync`: it stays on the thread
/// that built it (as `mpi::initialize` sets MPI up for one thread).
pub struct Communicator {
    boot: Bootstrap,
    config: Config,
    table: std::sync::RwLock<DispatchTable>,
    state: Mutex<State>,
    /// The GPU side, created on the first device call (`None` until then, and on machines
    /// without CUDA).
    gpu: Mutex<Option<GpuState>>,
    /// Every rank has a CUDA driver and can load libnccl (found once, at bootstrap).
    nccl_library: bool,
    /// The ranks of my local index on every node, for the NCCL leg of device calls across nodes
    /// (`None` on one node and on ranks that own no shard).
    cross_device: Option<mpi::topology::SimpleCommunicator>,
    /// The note that large device messages go chunked for want of NCCL was printed.
    chunk_note: std::sync::atomic::AtomicBool,
}

/// Everything that changes per call, behind the communicator's lock.
struct State {
    host: HostAllreduce,
    cross: Option<CrossNode>,
    poisoned: Option<String>,
}

impl Communicator {
    /// Bootstrap over `comm` (the world or any split of it) with `config`.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same configuration.
    ///
    /// # Errors
    /// [`Error::System`] when the node's shared-memory segment cannot be made (for example a
    /// too small `/dev/shm`), [`Error::Mpi`] when a split fails.
    ///
    /// # Examples
    /// See `examples/hello_allreduce.rs`.
    pub fn new<C: mpi::traits::Communicator>(comm: &C, config: Config) -> Result<Self> {
        config.validate()?;
        let boot = Bootstrap::new(comm, config.fake_nodes)?;
        check_same_config(&boot, &config)?;
        let host = open_host_segment(&boot, &config)?;
        let cross = if boot.nodes > 1 { Some(CrossNode::new(&boot)?) } else { None };
        let cross_device = if boot.nodes > 1 { crate::hierarchy::cross_communicator(&boot) } else { None };
        if config.debug {
            eprintln!("tpcomm: {}", boot.summary());
        }
        let mut table = DispatchTable::new(&config, boot.size);
        load_tuned_table(&boot, &config, &mut table)?;
        let table = std::sync::RwLock::new(table);
        let nccl_library = nccl_everywhere(&boot);
        Ok(Communicator {
            boot,
            config,
            table,
            state: Mutex::new(State { host, cross, poisoned: None }),
            gpu: Mutex::new(None),
            nccl_library,
            cross_device,
            chunk_note: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.boot.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.boot.size
    }

    /// The layout found at bootstrap (nodes, local ranks, rank_to_node, rank_to_ib).
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.boot
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dispatch table in force.
    pub fn dispatch_table(&self) -> DispatchTable {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Time the candidate algorithms on this machine over a size sweep and move the dispatch
    /// thresholds to the measured crossovers. Rank 0 decides from timings that are the maximum
    /// over ranks, and broadcasts, so every rank ends with the same table. With
    /// `TPCOMM_TUNE_FILE` set, rank 0 also saves the table there (keyed by CPU and GPU model,
    /// world size and layout), and later communicators load it instead of tuning again.
    /// Tunes the host one-shot limit and, where every rank has already used its GPU (for example
    /// through [`Communicator::cuda_context`]) on one node with custom kernels, the device packet
    /// and one-shot limits (bf16, registered input, CUDA graphs of 10 calls). Thresholds set through
    /// `TPCOMM_*_MAX_BYTES` are kept.
    ///
    /// # Collective
    /// Every rank, with no other call in flight.
    ///
    /// # Errors
    /// Any error of the timed calls; [`Error::System`] when the file cannot be written.
    pub fn tune(&self) -> Result<DispatchTable> {
        let host = self.tune_host()?;
        let device = match self.tune_device() {
            // No custom kernels on this layout (the verdict is the same on every rank).
            Err(Error::Unsupported { .. }) => None,
            other => other?,
        };
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if self.config.host_oneshot_max_bytes.is_none() {
            table.host_oneshot_max_bytes = host;
        }
        if let (Some((_, limit)), None) = (device, self.config.oneshot_max_bytes) {
            table.oneshot_max_bytes = limit;
        }
        if let (Some((limit, _)), None) = (device, self.config.packet_max_bytes) {
            table.packet_max_bytes = limit;
        }
        if let (Some(path), 0) = (&self.config.tune_file, self.boot.rank) {
            table.save(path, &tune_key(&self.boot))?;
        }
        Ok(table.clone())
    }

    /// Host one-shot against two-shot, 4 KiB to 4 MiB, median of 20 calls each.
    fn tune_host(&self) -> Result<usize> {
        let sizes: Vec<usize> = (12..=22).map(|p| 1usize << p).collect();
        let largest = *sizes.last().expect("sizes") / 4;
        let input: Vec<f32> = crate::verify::rank_input(0x7e57, self.boot.rank, largest);
        let mut output = vec![0.0f32; largest];
        self.measure_crossover(&sizes, [Algo::HostOneShot, Algo::HostTwoShot], |algo, bytes| {
            let mut samples = Vec::new();
            for rep in 0..23 {
                self.boot.world().barrier();
                let t = std::time::Instant::now();
                self.all_reduce_host_using(algo, Some(&input[..bytes / 4]), &mut output[..bytes / 4])?;
                if rep >= 3 {
                    samples.push(t.elapsed().as_secs_f64());
                }
            }
            Ok(median(samples))
        })
    }

    /// Device one-shot against two-shot (bf16, registered input), 4 KiB to the staging size,
    /// each timed as CUDA-graph replays of 10 calls. `None` unless every rank's GPU side exists
    /// already (after [`Communicator::cuda_context`] or any device call: a host-only job never
    /// touches the GPU here) and the ranks share one node.
    fn tune_device(&self) -> Result<Option<(usize, usize)>> {
        use mpi::collective::SystemOperation;
        let mine = u8::from(self.gpu_lock()?.is_some());
        let mut everyone = 0u8;
        self.boot.world().all_reduce_into(&mine, &mut everyone, SystemOperation::min());
        if everyone == 0 || self.boot.nodes > 1 || self.boot.size == 1 {
            return Ok(None);
        }
        let ctx = self.cuda_context()?;
        let stream = ctx.new_stream()?;
        let max = self.config.custom_max_bytes;
        let sizes: Vec<usize> = (12..=34).map(|p| 1usize << p).take_while(|&b| b <= max).collect();
        let len = max / 2;
        let input = self.alloc_shared::<half::bf16>(len)?;
        let output = self.alloc_device::<half::bf16>(len)?;
        let data: Vec<half::bf16> = crate::verify::rank_input(0x7e57, self.boot.rank, len);
        // SAFETY: plain-old-data view of the bf16 values.
        input.mem.write_at(0, unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), len * 2) })?;
        let (inp, out) = (input.device_address(), output.device_address());
        let mut time = |algo: Algo, bytes: usize| -> Result<f64> {
            let n = bytes / 2;
            let graph = self.capture(&stream, |s| {
                (0..10).try_for_each(|_| self.device_call::<half::bf16>(Some(algo), inp, out, n, s, true))
            })?;
            graph.launch()?;
            stream.synchronize()?;
            let mut samples = Vec::new();
            for _ in 0..11 {
                self.boot.world().barrier();
                let t = std::time::Instant::now();
                graph.launch()?;
                stream.synchronize()?;
                samples.push(t.elapsed().as_secs_f64() / 10.0);
            }
            self.check_device_errors()?;
            Ok(median(samples))
        };
        let oneshot = self.measure_crossover(&sizes, [Algo::OneShot, Algo::TwoShot], &mut time)?;
        let packet_top = self.config.packet_buffer_bytes.min(512 << 10);
        let small: Vec<usize> = sizes.iter().copied().filter(|&b| b <= packet_top).collect();
        let packet = self.measure_crossover(&small, [Algo::Packet, Algo::OneShot], &mut time)?;
        Ok(Some((packet, oneshot)))
    }

    /// Time `candidates[0]` against `candidates[1]` at every size (`time` gives this rank's
    /// seconds per call), take the maximum over ranks, and return the crossover rank 0 picks.
    ///
    /// # Collective
    /// Every rank, same sizes and candidates.
    fn measure_crossover(
        &self,
        sizes: &[usize],
        candidates: [Algo; 2],
        mut time: impl FnMut(Algo, usize) -> Result<f64>,
    ) -> Result<usize> {
        use mpi::collective::SystemOperation;
        let mut times = [Vec::new(), Vec::new()];
        for &bytes in sizes {
            for (i, algo) in candidates.into_iter().enumerate() {
                // Every rank learns whether any rank failed, so none waits for the others in
                // the next collective while they return.
                let result = time(algo, bytes);
                let mine = [*result.as_ref().unwrap_or(&0.0), f64::from(u8::from(result.is_err()))];
                let mut worst = [0.0f64; 2];
                self.boot.world().all_reduce_into(&mine[..], &mut worst[..], SystemOperation::max());
                if worst[1] > 0.0 {
                    return Err(result.err().unwrap_or_else(|| Error::Unsupported {
                        what: format!("tuning {algo} at {bytes} bytes"),
                        reason: "a timed call failed on another rank (see its error)".into(),
                    }));
                }
                times[i].push(worst[0]);
            }
        }
        let mut limit = crate::dispatch::crossover(sizes, &times[0], &times[1]) as u64;
        self.boot.world().process_at_rank(0).broadcast_into(&mut limit);
        Ok(limit as usize)
    }

    /// The request of a call of `len` elements of `T` in `memory`, served by `backends`
    /// (device memory only).
    fn request<T: Element>(&self, len: usize, memory: Memory, backends: Backends) -> Request {
        Request {
            custom_available: backends.custom,
            nccl_available: backends.nccl,
            ..Request::new(len * size_of::<T>(), T::DTYPE, self.boot.size, self.boot.nodes, memory)
        }
    }

    /// The dispatch table's choice for a call of `len` elements of `T` in `memory`.
    fn algo_for<T: Element>(&self, len: usize, memory: Memory, backends: Backends) -> Result<Algo> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).choose(&self.request::<T>(len, memory, backends))
    }

    /// The algorithm the dispatch table picks for a host call of `len` elements of `T`.
    ///
    /// # Errors
    /// As [`DispatchTable::choose`].
    pub fn host_algo<T: Element>(&self, len: usize) -> Result<Algo> {
        self.algo_for::<T>(len, Memory::Host, Backends { custom: false, nccl: false })
    }

    /// Sum `input` over all ranks into `output` (host memory).
    ///
    /// # Collective
    /// Every rank, same length and element type.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `input` and `output` differ in length (peers then see
    /// [`Error::PeerTimeout`]), [`Error::Mismatch`] when ranks pass different lengths,
    /// [`Error::PeerTimeout`] when a peer does not call within `TPCOMM_TIMEOUT_MS`.
    ///
    /// # Examples
    /// See `examples/hello_allreduce.rs`.
    pub fn all_reduce_host<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        let algo = self.host_algo::<T>(output.len())?;
        self.all_reduce_host_using(algo, Some(input), output)
    }

    /// Sum `buf` over all ranks, in place (host memory).
    ///
    /// # Collective
    /// As [`Communicator::all_reduce_host`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_host`].
    pub fn all_reduce_host_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let algo = self.host_algo::<T>(buf.len())?;
        self.all_reduce_host_using(algo, None, buf)
    }

    /// Host allreduce with an explicit algorithm (`input = None`: in place). For benchmarks and
    /// tests; [`Communicator::all_reduce_host`] asks the dispatch table instead.
    ///
    /// # Collective
    /// Every rank, same length, element type and algorithm.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_host`]; [`Error::Unsupported`] for a non-host algorithm.
    pub fn all_reduce_host_using<T: Element>(&self, algo: Algo, input: Option<&[T]>, output: &mut [T]) -> Result<()> {
        if algo.memory() != Memory::Host {
            return Err(Error::Unsupported {
                what: format!("algorithm {algo} on host memory"),
                reason: "pick a host_* algorithm".into(),
            });
        }
        if let Some(input) = input {
            if input.len() != output.len() {
                return Err(Error::invalid(
                    "all_reduce_host",
                    format!("input has {} elements but output has {}", input.len(), output.len()),
                ));
            }
        }
        let mut state = self.state.lock().map_err(|_| Error::Poisoned { cause: "a call panicked".into() })?;
        if let Some(cause) = &state.poisoned {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        if self.config.debug && self.boot.rank == 0 {
            eprintln!("tpcomm: host allreduce {} x {} -> {algo}", output.len(), T::DTYPE);
        }
        let result = state.run(algo, input, output, self.config.timeout);
        if let Err(e) = &result {
            if e.desynchronizes() && state.poisoned.is_none() {
                state.poisoned = Some(e.to_string());
            }
        }
        result
    }
}

impl State {
    fn run<T: Element>(
        &mut self,
        algo: Algo,
        input: Option<&[T]>,
        output: &mut [T],
        timeout: std::time::Duration,
    ) -> Result<()> {
        self.host.all_reduce(input, output, algo)?;
        let Some(cross) = &self.cross else { return Ok(()) };
        let len = output.len();
        cross.sum_across_nodes(&mut output[cross.my_shard(len)], timeout)?;
        self.host.all_gather_ranges(output, &cross.shard_ranges(len))
    }
}

/// Load `TPCOMM_TUNE_FILE` into `table` when it exists. Rank 0 reads the file and every rank
/// parses the same text, so all ranks agree (also where other nodes cannot see the file).
///
/// # Collective
/// Every rank of the bootstrap's communicator.
fn load_tuned_table(boot: &Bootstrap, config: &Config, table: &mut DispatchTable) -> Result<()> {
    let Some(path) = &config.tune_file else { return Ok(()) };
    // First byte of the broadcast: 0 no file, 1 the text follows, 2 an error message follows.
    let mut blob = vec![0u8];
    if boot.rank == 0 && path.exists() {
        blob = match std::fs::read(path) {
            Ok(text) => [&[1u8][..], &text].concat(),
            Err(e) => [&[2u8][..], e.to_string().as_bytes()].concat(),
        };
    }
    broadcast_bytes(boot.world(), 0, &mut blob);
    let body = String::from_utf8_lossy(&blob[1..]);
    match blob[0] {
        1 => table.load(&body, path, &tune_key(boot), config)?,
        2 => {
            return Err(Error::System {
                op: format!("reading tuned dispatch table {} on rank 0", path.display()),
                source: std::io::Error::other(body.into_owned()),
            })
        }
        _ => {}
    }
    Ok(())
}

/// The median of some samples (the upper one of an even count).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// What a tuned table of this communicator must have been tuned for.
fn tune_key(boot: &Bootstrap) -> crate::dispatch::TuneKey {
    let per_node: Vec<usize> = (0..boot.nodes).map(|n| boot.rank_to_node.iter().filter(|&&m| m == n).count()).collect();
    crate::dispatch::TuneKey::new(boot.size, &per_node)
}

/// Every rank must run with the same configuration (differing chunk sizes or algorithms would
/// make ranks disagree about shared memory). Every rank compares every configuration with rank
/// 0's, so all of them fail together and name the same rank.
fn check_same_config(boot: &Bootstrap, config: &Config) -> Result<()> {
    let all = all_gather_bytes(boot.world(), config.dump().as_bytes());
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        if *theirs != all[0] {
            let (a, b) = (String::from_utf8_lossy(&all[0]), String::from_utf8_lossy(theirs));
            let differs: Vec<String> = a
                .lines()
                .zip(b.lines())
                .filter(|(x, y)| x != y)
                .map(|(x, y)| format!("rank 0: {} / rank {rank}: {}", x.trim_end(), y.trim_end()))
                .collect();
            return Err(Error::Mismatch {
                op: "Communicator::new",
                detail: format!("ranks run with different TPCOMM_* settings: {}", differs.join("; ")),
            });
        }
    }
    Ok(())
}

/// Local rank 0 creates the node's segment and broadcasts its name; the others open it; after
/// a node barrier the name is unlinked, so nothing outlives the job.
fn open_host_segment(boot: &Bootstrap, config: &Config) -> Result<HostAllreduce> {
    let node = boot.node();
    let n = boot.nranks_per_node;
    let bytes = HostAllreduce::segment_bytes(n, config.host_chunk_bytes);
    let mut name = Vec::new();
    let mut created = None;
    let mut failure = None;
    if boot.local_rank == 0 {
        let candidate = format!(
            "/tpcomm.{}.{}.{}",
            std::process::id(),
            SEGMENTS.fetch_add(1, Ordering::Relaxed),
            boot.node_index()
        );
        match ShmSegment::create(&candidate, bytes) {
            Ok(seg) => {
                name = candidate.into_bytes();
                created = Some(seg);
            }
            Err(e) => failure = Some(e),
        }
    }
    broadcast_bytes(node, 0, &mut name);
    if name.is_empty() {
        return Err(failure.unwrap_or_else(|| Error::System {
            op: format!("creating the node's shared-memory segment of {bytes} bytes on local rank 0"),
            source: std::io::Error::other("failed on local rank 0; see its error"),
        }));
    }
    let opened = match created {
        Some(seg) => Ok(seg),
        None => ShmSegment::open(std::str::from_utf8(&name).expect("ascii name"), bytes),
    };
    // Everyone has tried to open before the name goes away.
    let ok = opened.is_ok() as u8;
    let mut all_ok = 0u8;
    node.all_reduce_into(&ok, &mut all_ok, mpi::collective::SystemOperation::min());
    let seg = opened?;
    if boot.local_rank == 0 {
        seg.unlink()?;
    }
    if all_ok == 0 {
        return Err(Error::System {
            op: format!("opening shared-memory segment {}", seg.name()),
            source: std::io::Error::other("another rank of this node could not open it"),
        });
    }
    let global_ranks: Vec<usize> = (0..boot.size).filter(|&r| boot.rank_to_node[r] == boot.node_index()).collect();
    HostAllreduce::new(seg, boot.local_rank, global_ranks, config.host_chunk_bytes, config.timeout)
}

/// Whether every rank has a CUDA driver and can load libnccl, so the dispatch table may choose
/// NCCL. Loads nothing where there is no CUDA driver (host-only machines).
///
/// # Collective
/// Every rank of the bootstrap's communicator.
fn nccl_everywhere(boot: &Bootstrap) -> bool {
    let mine = u8::from(crate::cuda::driver_present() && crate::backend::nccl::library_present());
    let mut all = 0u8;
    boot.world().all_reduce_into(&mine, &mut all, mpi::collective::SystemOperation::min());
    all == 1
}

// ------------------------------------------------------------------------------------------------
// Device memory: the custom CUDA IPC allreduce.

use crate::backend::custom::{CustomAllreduce, CustomOptions, Kernel, Mode};
use crate::backend::nccl::{NcclAllreduce, NcclOptions};
use crate::backend::packet::{PacketAllreduce, PacketKernel, PacketOptions};
use crate::cuda::ipc::IpcBuffer;
use cudarc::driver::{CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::sync::Arc;

/// Which device backends can serve calls on this layout (the same verdict on every rank).
#[derive(Debug, Clone, Copy)]
struct Backends {
    /// The custom IPC kernels (P2P between the GPUs in use on every node).
    custom: bool,
    /// NCCL (libnccl on every rank, one rank per GPU, not found unsupported before).
    nccl: bool,
}

/// The GPU side of a communicator.
struct GpuState {
    ctx: Arc<CudaContext>,
    /// Built by the first collective device call that needs it.
    custom: Option<CustomAllreduce>,
    /// Built by the first collective device call that needs it.
    packet: Option<PacketAllreduce>,
    /// Why the CUDA IPC kernels (custom and packet) cannot run on this GPU layout, once found
    /// (the same on every rank, so later calls fail at once without another collective check).
    ipc_unsupported: Option<String>,
    /// Ranks of this node share a GPU (found with the layout, by the first device call), which
    /// NCCL refuses.
    ranks_share_gpu: bool,
    /// Built by the first collective device call routed to NCCL.
    nccl: Option<NcclAllreduce>,
    /// NCCL among the ranks of my local index on every node (the hierarchy's cross-node leg);
    /// `None` on ranks that own no shard. Built once `nccl_cross_built`.
    nccl_cross: Option<NcclAllreduce>,
    nccl_cross_built: bool,
    /// The backends every rank can use, once found (see [`Communicator::device_backends`]).
    backends: Option<Backends>,
    /// Why NCCL cannot run here (shared GPUs, no libnccl), once found; the same on every rank.
    nccl_unsupported: Option<String>,
    /// Buffers from [`Communicator::alloc_shared`] and [`Communicator::alloc_device`], kept
    /// until the communicator goes: peers may hold mappings of them, and a freed allocation
    /// whose memory a peer still maps cannot be opened again by that peer.
    shared: Vec<Arc<IpcBuffer>>,
    poisoned: Option<String>,
}

/// Device memory from `cuMemAlloc`, usable wherever cudarc takes a [`CudaSlice`] (it derefs to
/// one). From [`Communicator::alloc_shared`] it is registered with every peer, so allreduces
/// whose input lies in it copy nothing; from [`Communicator::alloc_device`] it is not, but CUDA
/// graphs capturing allreduces of it read it in place (it can be exported over IPC, unlike
/// cudarc's stream-ordered allocations).
pub struct DeviceBuffer<T> {
    slice: std::mem::ManuallyDrop<CudaSlice<T>>,
    mem: Arc<IpcBuffer>,
}

impl<T> DeviceBuffer<T> {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        let mem = Arc::new(IpcBuffer::alloc(ctx, len * size_of::<T>())?);
        // SAFETY: the allocation holds `len` elements of T and outlives the slice (the Arc is
        // kept beside it); the slice is leaked, never freed by cudarc, in Drop.
        let slice = unsafe { ctx.default_stream().upgrade_device_ptr::<T>(mem.ptr(), len) };
        Ok(DeviceBuffer { slice: std::mem::ManuallyDrop::new(slice), mem })
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.mem.ptr()
    }
}

impl<T> std::ops::Deref for DeviceBuffer<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> std::ops::DerefMut for DeviceBuffer<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> DeviceSlice<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        self.slice.len()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        DeviceSlice::stream(&*self.slice)
    }
}

impl<T> DevicePtr<T> for DeviceBuffer<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for DeviceBuffer<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (cudarc::driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr_mut(stream)
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; cudarc must not free memory it did not allocate.
        let slice = unsafe { std::mem::ManuallyDrop::take(&mut self.slice) };
        let _ = slice.leak();
    }
}

impl Communicator {
    fn gpu_lock(&self) -> Result<std::sync::MutexGuard<'_, Option<GpuState>>> {
        self.gpu.lock().map_err(|_| Error::Poisoned { cause: "a device call panicked".into() })
    }

    fn with_gpu<R>(&self, f: impl FnOnce(&mut GpuState) -> Result<R>) -> Result<R> {
        let mut guard = self.gpu_lock()?;
        if guard.is_none() {
            if !crate::cuda::driver_present() {
                return Err(Error::Unsupported {
                    what: "allreduce of device memory".into(),
                    reason: "no CUDA driver library (libcuda) can be loaded on this machine".into(),
                });
            }
            let ordinal = crate::topology::local_gpu_index(self.boot.local_rank);
            let ctx = CudaContext::new(ordinal).map_err(crate::cuda::cuda("cuCtxCreate / primary context"))?;
            *guard = Some(GpuState {
                ctx,
                custom: None,
                packet: None,
                ipc_unsupported: None,
                ranks_share_gpu: false,
                nccl: None,
                nccl_cross: None,
                nccl_cross_built: false,
                backends: None,
                nccl_unsupported: None,
                shared: Vec::new(),
                poisoned: None,
            });
        }
        let gpu = guard.as_mut().expect("set above");
        if let Some(cause) = &gpu.poisoned {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        gpu.ctx.bind_to_thread().map_err(crate::cuda::cuda("cuCtxSetCurrent"))?;
        let result = f(gpu);
        if let Err(e) = &result {
            if e.desynchronizes() && gpu.poisoned.is_none() {
                gpu.poisoned = Some(e.to_string());
            }
        }
        result
    }

    /// The node's GPU layout where the CUDA IPC kernels can run on it (collective: every rank
    /// reaches it through the same collective call).
    fn ipc_layout(&self, gpu: &mut GpuState) -> Result<crate::topology::GpuLayout> {
        const WHAT: &str = "CUDA IPC allreduce (custom and packet kernels)";
        if let Some(reason) = &gpu.ipc_unsupported {
            return Err(Error::Unsupported { what: WHAT.into(), reason: reason.clone() });
        }
        // Across nodes the kernels serve each node's ranks (the hierarchy's node steps). More
        // ranks on a node than the kernels span go to NCCL instead (the same verdict on every
        // rank of the node, from the bootstrap's layout).
        if self.boot.nranks_per_node > crate::cuda::protocol::MAX_RANKS {
            let reason = format!(
                "{} ranks share a node and the IPC kernels span at most {}",
                self.boot.nranks_per_node,
                crate::cuda::protocol::MAX_RANKS
            );
            gpu.ipc_unsupported = Some(reason.clone());
            return Err(Error::Unsupported { what: WHAT.into(), reason });
        }
        let layout = crate::topology::gpu_layout(self.boot.node(), &gpu.ctx);
        gpu.ranks_share_gpu = layout.max_ranks_per_device > 1;
        if let Some(reason) = &layout.unsupported {
            // Logged once per communicator and rank: the caller may fall back silently.
            eprintln!("tpcomm: rank {}: {WHAT} unavailable: {reason}", self.boot.rank);
            gpu.ipc_unsupported = Some(reason.clone());
            return Err(Error::Unsupported { what: WHAT.into(), reason: reason.clone() });
        }
        Ok(layout)
    }

    fn cache_dir(&self) -> Option<std::path::PathBuf> {
        Some(self.config.cache_dir.clone().unwrap_or_else(crate::cuda::module_cache::default_cache_dir))
    }

    /// Build the packet allreduce on first use (collective, as [`Communicator::ipc_layout`]).
    fn ensure_packet(&self, gpu: &mut GpuState) -> Result<()> {
        if gpu.packet.is_some() {
            return Ok(());
        }
        let layout = self.ipc_layout(gpu)?;
        let opts = PacketOptions {
            max_bytes: self.config.packet_buffer_bytes,
            timeout: self.config.timeout,
            ranks_per_device: layout.max_ranks_per_device,
            max_blocks: None,
            block_threads: self.config.packet_threads,
            cache_dir: self.cache_dir(),
        };
        let packet = PacketAllreduce::new(self.boot.node(), &gpu.ctx, &opts)?;
        if self.config.debug && self.boot.rank == 0 {
            eprintln!(
                "tpcomm: packet allreduce ready: {} ranks, {} blocks max, {} buffer bytes",
                packet.world_size(),
                packet.max_blocks(),
                packet.max_bytes()
            );
        }
        gpu.packet = Some(packet);
        Ok(())
    }

    /// Build the custom allreduce on first use (collective, as [`Communicator::ipc_layout`]).
    fn ensure_custom(&self, gpu: &mut GpuState) -> Result<()> {
        if gpu.custom.is_some() {
            return Ok(());
        }
        let layout = self.ipc_layout(gpu)?;
        let node = self.boot.node();
        let opts = CustomOptions {
            max_bytes: self.config.custom_max_bytes,
            timeout: self.config.timeout,
            ranks_per_device: layout.max_ranks_per_device,
            cache_dir: self.cache_dir(),
        };
        let custom = CustomAllreduce::new(node, &gpu.ctx, &opts)?;
        if self.config.debug && self.boot.rank == 0 {
            eprintln!(
                "tpcomm: custom allreduce ready: {} ranks, {} per GPU at most, full NVLink {}, {} blocks max, {} staging bytes",
                custom.world_size(),
                layout.max_ranks_per_device,
                layout.full_nvlink,
                custom.max_blocks(),
                custom.max_bytes()
            );
        }
        gpu.custom = Some(custom);
        Ok(())
    }

    /// Which device backends can serve calls here, building the custom kernels on first use and
    /// remembering the answer. The custom kernels are unavailable for a layout verdict (no P2P,
    /// more ranks on a node than they span), the same on every rank of a node; across nodes the
    /// verdicts of all nodes are combined, so every rank chooses alike. Their other failures are
    /// errors (on every rank).
    ///
    /// # Collective
    /// Every rank, the first time.
    fn device_backends(&self, gpu: &mut GpuState) -> Result<Backends> {
        if let Some(b) = gpu.backends {
            return Ok(b);
        }
        let (custom, failure) = match self.ensure_custom(gpu) {
            Ok(()) => (true, None),
            Err(Error::Unsupported { .. }) if self.boot.nodes > 1 || gpu.ipc_unsupported.is_some() => (false, None),
            // One node alone failing must not leave the other nodes waiting below.
            Err(e) if self.boot.nodes > 1 => (false, Some(e)),
            Err(e) => return Err(e),
        };
        let nccl = self.nccl_library && !gpu.ranks_share_gpu && gpu.nccl_unsupported.is_none();
        let mut backends = Backends { custom, nccl };
        if self.boot.nodes > 1 {
            // Each node found its own verdict; every rank must choose alike.
            use mpi::collective::SystemOperation;
            let mine = [u8::from(custom), u8::from(nccl), u8::from(failure.is_none())];
            let mut all = [0u8; 3];
            self.boot.world().all_reduce_into(&mine[..], &mut all[..], SystemOperation::min());
            if let Some(e) = failure {
                return Err(e);
            }
            if all[2] == 0 {
                return Err(Error::Unsupported {
                    what: "device allreduce across nodes".into(),
                    reason: "setting up the IPC kernels failed on another node (see its error)".into(),
                });
            }
            backends = Backends { custom: all[0] == 1, nccl: all[1] == 1 };
        }
        gpu.backends = Some(backends);
        Ok(backends)
    }

    /// Why NCCL is not available here, for debug output.
    fn nccl_missing_reason(&self, gpu: &GpuState) -> String {
        if !self.nccl_library {
            "libnccl.so.2 cannot be loaded on every rank".into()
        } else if gpu.ranks_share_gpu {
            "ranks share a GPU, which NCCL refuses".into()
        } else {
            gpu.nccl_unsupported.clone().unwrap_or_default()
        }
    }

    /// Build the NCCL communicator on first use.
    ///
    /// # Collective
    /// Every rank, through the same collective call.
    fn ensure_nccl(&self, gpu: &mut GpuState) -> Result<()> {
        if gpu.nccl.is_some() {
            return Ok(());
        }
        if let Some(reason) = &gpu.nccl_unsupported {
            return Err(Error::Unsupported { what: "NCCL allreduce".into(), reason: reason.clone() });
        }
        match NcclAllreduce::new(self.boot.world(), &gpu.ctx, &NcclOptions { timeout: self.config.timeout }) {
            Ok(nccl) => {
                if self.config.debug && self.boot.rank == 0 {
                    eprintln!(
                        "tpcomm: NCCL ready: {} ranks, libnccl version code {}",
                        nccl.world_size(),
                        nccl.version()
                    );
                }
                gpu.nccl = Some(nccl);
                Ok(())
            }
            Err(e) => {
                if let Error::Unsupported { reason, .. } = &e {
                    if self.config.debug {
                        eprintln!("tpcomm: rank {}: NCCL unavailable: {reason}", self.boot.rank);
                    }
                    gpu.nccl_unsupported = Some(reason.clone());
                    gpu.backends = None;
                }
                Err(e)
            }
        }
    }

    /// The CUDA context of this rank's GPU (`local_rank % devices`), created on first use.
    /// Allocate buffers and streams from it.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when no CUDA driver is present; [`Error::Cuda`].
    pub fn cuda_context(&self) -> Result<Arc<CudaContext>> {
        self.with_gpu(|gpu| Ok(gpu.ctx.clone()))
    }

    /// The algorithm the dispatch table picks for a device call of `len` elements of `T`.
    ///
    /// # Collective
    /// Every rank, the first time it is called or any device call is made: it learns whether
    /// the custom kernels can run on this layout (and builds them where they can).
    ///
    /// # Errors
    /// As [`DispatchTable::choose`]; errors building the custom kernels.
    pub fn device_algo<T: Element>(&self, len: usize) -> Result<Algo> {
        let backends = self.with_gpu(|gpu| self.device_backends(gpu))?;
        self.algo_for::<T>(len, Memory::Device, backends)
    }

    /// Sum `input` over all ranks into `output` (device memory: f32, f16 or bf16; f64 through
    /// NCCL), on `stream`.
    ///
    /// The dispatch table picks the algorithm: one rank copies; the packet kernels up to
    /// `TPCOMM_PACKET_MAX_BYTES` (no registration needed: every rank pushes its own data); the
    /// custom IPC kernels up to `TPCOMM_CUSTOM_MAX_BYTES`; NCCL above and where the GPUs lack
    /// P2P; the hierarchy (`hier`) when the ranks span nodes; chunked custom calls in
    /// deterministic mode or without libnccl. For the custom kernels, an input inside a buffer
    /// from [`Communicator::alloc_shared`] is read in place by the peers; any other input is
    /// first copied into this rank's IPC staging buffer. Outside stream capture the call waits for the result (bounded by
    /// `TPCOMM_TIMEOUT_MS`); while `stream` captures (inside [`Communicator::capture`]) it is
    /// recorded instead.
    ///
    /// # Collective
    /// Every rank, same length and element type.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for different input and output lengths or pointers that are not
    /// 16-byte aligned (custom kernels); [`Error::Unsupported`] for f64 on the custom kernels,
    /// for NCCL where two ranks share a GPU or libnccl is missing, and for deterministic calls
    /// across nodes; [`Error::Nccl`] for NCCL's failures;
    /// [`Error::PeerTimeout`] when a peer does not arrive within `TPCOMM_TIMEOUT_MS`;
    /// [`Error::Mismatch`] when ranks pass different lengths, element types or algorithms (the
    /// custom kernels compare a tag of the call at every barrier, the packet kernels in a call
    /// header; where the difference also changes a custom kernel's grid, the rank with more
    /// blocks returns only after its extra blocks time out).
    ///
    /// # Examples
    /// ```no_run
    /// # fn main() -> tpcomm::Result<()> {
    /// let universe = mpi::initialize().expect("MPI initialised twice");
    /// let comm = tpcomm::Communicator::new(&universe.world(), tpcomm::Config::from_env()?)?;
    /// let stream = comm.cuda_context()?.new_stream()?;
    /// let len = 1 << 20;
    /// let mut x = comm.alloc_shared::<tpcomm::bf16>(len)?; // collective: registered, zero-copy
    /// stream.memcpy_htod(&vec![tpcomm::bf16::from_f32(1.0); len], &mut *x)?;
    /// let mut y = stream.alloc_zeros::<tpcomm::bf16>(len)?;
    /// comm.all_reduce(&*x, &mut y, &stream)?; // collective: every rank
    /// comm.all_reduce_in_place(&mut *x, &stream)?;
    /// // Capture once, replay many times (collective): the buffers are registered after capture.
    /// let graph = comm.capture(&stream, |s| comm.all_reduce(&*x, &mut y, s))?;
    /// graph.launch()?;
    /// # Ok(()) }
    /// ```
    /// More in `examples/gpu_check.rs` and `examples/allreduce_perf.rs`.
    pub fn all_reduce<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &self,
        input: &I,
        output: &mut O,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        self.all_reduce_using(None, input, output, stream)
    }

    /// As [`Communicator::all_reduce`] with an explicit algorithm ([`Algo::OneShot`],
    /// [`Algo::TwoShot`], [`Algo::Nccl`] or [`Algo::Chunked`]; `None` asks the dispatch table).
    /// For tests and benchmarks.
    ///
    /// # Collective
    /// Every rank, same length, element type and algorithm.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`]; [`Error::Unsupported`] for a host algorithm.
    pub fn all_reduce_using<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &self,
        algo: Option<Algo>,
        input: &I,
        output: &mut O,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        self.out_of_place_call(algo, input, output, stream, false)
    }

    /// As [`Communicator::all_reduce_using`], but the input must lie in a buffer from
    /// [`Communicator::alloc_shared`]: the zero-copy path only, never staged (the seed's
    /// `all_reduce` without a staging buffer).
    ///
    /// # Collective
    /// Every rank, same length, element type and algorithm.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_using`]; [`Error::InvalidArgument`] for an input outside
    /// registered memory.
    pub fn all_reduce_registered_using<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &self,
        algo: Option<Algo>,
        input: &I,
        output: &mut O,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        self.out_of_place_call(algo, input, output, stream, true)
    }

    /// Check the lengths and take the raw pointers (recording stream use) of an out-of-place call.
    fn out_of_place_call<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &self,
        algo: Option<Algo>,
        input: &I,
        output: &mut O,
        stream: &Arc<CudaStream>,
        registered_only: bool,
    ) -> Result<()> {
        if input.len() != output.len() {
            return Err(Error::invalid(
                "all_reduce",
                format!("input has {} elements but output has {}", input.len(), output.len()),
            ));
        }
        let len = output.len();
        let (inp, _read) = input.device_ptr(stream);
        let (out, _write) = output.device_ptr_mut(stream);
        self.device_call::<T>(algo, inp, out, len, stream, registered_only)
    }

    /// Sum `buf` over all ranks, in place (device memory).
    ///
    /// # Collective
    /// As [`Communicator::all_reduce`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    pub fn all_reduce_in_place<T: Element, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        self.all_reduce_in_place_using(None, buf, stream)
    }

    /// As [`Communicator::all_reduce_in_place`] with an explicit algorithm.
    ///
    /// # Collective
    /// Every rank, same length, element type and algorithm.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_using`].
    pub fn all_reduce_in_place_using<T: Element, B: DevicePtrMut<T>>(
        &self,
        algo: Option<Algo>,
        buf: &mut B,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let len = buf.len();
        let (p, _write) = buf.device_ptr_mut(stream);
        self.device_call::<T>(algo, p, p, len, stream, false)
    }

    fn device_call<T: Element>(
        &self,
        algo: Option<Algo>,
        input: u64,
        output: u64,
        len: usize,
        stream: &Arc<CudaStream>,
        registered_only: bool,
    ) -> Result<()> {
        let (algo, why) = match algo {
            Some(a) => (a, String::new()),
            None => {
                let (backends, nccl_missing) =
                    self.with_gpu(|gpu| Ok((self.device_backends(gpu)?, self.nccl_missing_reason(gpu))))?;
                let algo = self.algo_for::<T>(len, Memory::Device, backends)?;
                let why = match algo {
                    Algo::Nccl if self.boot.nodes > 1 => " (the ranks span several nodes)".to_string(),
                    Algo::Nccl if !backends.custom => {
                        " (the custom kernels cannot run here: no P2P between the GPUs)".to_string()
                    }
                    Algo::Nccl => " (over TPCOMM_CUSTOM_MAX_BYTES)".to_string(),
                    Algo::Chunked if self.config.deterministic => {
                        " (deterministic, over TPCOMM_CUSTOM_MAX_BYTES)".to_string()
                    }
                    Algo::Chunked => format!(" (over TPCOMM_CUSTOM_MAX_BYTES; NCCL unavailable: {nccl_missing})"),
                    _ => String::new(),
                };
                (algo, why)
            }
        };
        if self.boot.nodes > 1 && !matches!(algo, Algo::Nccl | Algo::Hierarchical) {
            return Err(Error::Unsupported {
                what: format!("{algo} across {} nodes", self.boot.nodes),
                reason: "it reduces among the ranks of one node; across nodes use hier or nccl (or unset TPCOMM_ALGO)"
                    .into(),
            });
        }
        if self.config.debug && self.boot.rank == 0 {
            eprintln!("tpcomm: device allreduce {len} x {} -> {algo}{why}", T::DTYPE);
            if algo == Algo::Chunked && !self.config.deterministic && !self.chunk_note.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "tpcomm: device messages over {} bytes go through the custom kernels in chunks{why}",
                    self.config.custom_max_bytes
                );
            }
        }
        self.run_device::<T>(algo, input, output, len, stream, registered_only)
    }

    /// Run a chosen device algorithm (the node steps of the hierarchy and the chunks of a
    /// chunked call come here directly).
    fn run_device<T: Element>(
        &self,
        algo: Algo,
        input: u64,
        output: u64,
        len: usize,
        stream: &Arc<CudaStream>,
        registered_only: bool,
    ) -> Result<()> {
        let kernel = match algo {
            Algo::OneShot => Kernel::OneShot,
            Algo::TwoShot => Kernel::TwoShot,
            Algo::Chunked => return self.chunked_call::<T>(input, output, len, stream, registered_only),
            Algo::Nccl => return self.nccl_call::<T>(input, output, len, stream),
            Algo::Hierarchical => return self.hierarchical_call::<T>(input, output, len, stream, registered_only),
            Algo::Copy => return self.copy_call::<T>(input, output, len, stream),
            Algo::Packet => return self.packet_call::<T>(PacketKernel::AllPairs, input, output, len, stream),
            Algo::PacketTwoPhase => return self.packet_call::<T>(PacketKernel::TwoPhase, input, output, len, stream),
            Algo::Lamport => return self.packet_call::<T>(PacketKernel::Lamport, input, output, len, stream),
            other => {
                return Err(Error::Unsupported {
                    what: format!("algorithm {other} on device memory"),
                    reason: "pick a device algorithm (oneshot, twoshot, packet, packet2, lamport, nccl, chunked, \
                             hier) or unset TPCOMM_ALGO"
                        .into(),
                })
            }
        };
        self.with_gpu(|gpu| {
            self.ensure_custom(gpu)?;
            let ctx = gpu.ctx.clone();
            let custom = gpu.custom.as_mut().expect("built above");
            let bytes = len * size_of::<T>();
            let capturing = crate::cuda::is_capturing(stream)?;
            let mode = if registered_only || custom.is_registered(input, bytes) {
                Mode::Registered
            } else if capturing && crate::cuda::ipc::export(&ctx, input).is_ok() {
                // Read in place by the graph; peers learn its address after capture.
                Mode::Registered
            } else {
                Mode::Staged
            };
            // SAFETY: both pointers come from cudarc slices of `len` elements of T on this
            // context, kept alive (and their stream order recorded) by the caller's guards.
            unsafe { custom.all_reduce(stream, kernel, T::DTYPE, input, output, len, mode) }
        })
    }

    /// Exchange one flag with every peer on the GPU and wait for theirs: the floor of any
    /// cross-rank device call (a packet call of no data), which `allreduce_perf --floor` prints
    /// beside every latency. Recorded instead when `stream` captures.
    ///
    /// # Collective
    /// Every rank.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    pub fn exchange_flags(&self, stream: &Arc<CudaStream>) -> Result<()> {
        self.with_gpu(|gpu| {
            self.ensure_packet(gpu)?;
            let packet = gpu.packet.as_ref().expect("built above");
            // SAFETY: no element is read or written (length 0).
            unsafe { packet.all_reduce(stream, PacketKernel::AllPairs, crate::dtype::DType::BF16, 0, 0, 0) }
        })
    }

    /// The allreduce of one rank: its input, copied unless in place.
    fn copy_call<T: Element>(&self, input: u64, output: u64, len: usize, stream: &Arc<CudaStream>) -> Result<()> {
        if input == output || len == 0 {
            return Ok(());
        }
        self.with_gpu(|_| {
            // SAFETY: both ranges are device memory of `len` elements of T (caller's slices).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(output, input, len * size_of::<T>(), stream.cu_stream())
            }
            .map_err(crate::cuda::cuda("cuMemcpyDtoDAsync(one rank)"))
        })
    }

    /// Ranks on several nodes (the plan of [`crate::hierarchy`], as the host path): every node
    /// sums the message with its IPC kernels; each local rank that owns a shard sums it across
    /// nodes with NCCL (ranks of its local index, in place); every node then gathers the shards
    /// by an in-place node allreduce of the message with all but the rank's own shard zeroed
    /// (x + 0 = x, so every element takes its owner's value on every rank; a -0 comes out +0).
    fn hierarchical_call<T: Element>(
        &self,
        input: u64,
        output: u64,
        len: usize,
        stream: &Arc<CudaStream>,
        registered_only: bool,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let size = size_of::<T>();
        let local = self.boot.nranks_per_node;
        let node_table = DispatchTable::new(&self.config, local);
        let node_algo = node_table.choose_within_node(&Request::new(len * size, T::DTYPE, local, 1, Memory::Device))?;
        // 1. This node's partial sums (rank order inside the node) into `output`.
        self.run_device::<T>(node_algo, input, output, len, stream, registered_only)?;
        // 2. My shard across nodes.
        let ranges = crate::hierarchy::shard_ranges(len, self.boot.min_ranks_per_node(), local);
        let mine = ranges[self.boot.local_rank].clone();
        let shard = output + (mine.start * size) as u64;
        self.with_gpu(|gpu| {
            self.ensure_nccl_cross(gpu)?;
            let Some(nccl) = gpu.nccl_cross.as_mut() else { return Ok(()) };
            // SAFETY: `shard` is `mine.len()` elements of T inside the caller's output.
            let result = unsafe { nccl.all_reduce(stream, T::DTYPE, shard, shard, mine.len()) };
            poison_on_abort(&mut gpu.poisoned, nccl, result)
        })?;
        // 3. Gather: only my shard is non-zero in `output`, then the node sums it in place.
        for (start, end) in [(0, mine.start), (mine.end, len)] {
            if end > start {
                let at = output + (start * size) as u64;
                // SAFETY: the range lies inside the caller's output of `len` elements.
                unsafe { cudarc::driver::result::memset_d8_async(at, 0, (end - start) * size, stream.cu_stream()) }
                    .map_err(crate::cuda::cuda("cuMemsetD8Async(hierarchy gather)"))?;
            }
        }
        self.run_device::<T>(node_algo, output, output, len, stream, false)
    }

    /// Build NCCL among the ranks of my local index on every node, once (collective: every
    /// rank reaches it through the same hierarchical call; a failure anywhere fails everywhere).
    fn ensure_nccl_cross(&self, gpu: &mut GpuState) -> Result<()> {
        if gpu.nccl_cross_built {
            return Ok(());
        }
        let opts = NcclOptions { timeout: self.config.timeout };
        let built = match &self.cross_device {
            Some(comm) => NcclAllreduce::new(comm, &gpu.ctx, &opts).map(Some),
            None => Ok(None),
        };
        gpu.nccl_cross = crate::bootstrap::agree(self.boot.world(), built, "NCCL across nodes (hierarchy)")?;
        gpu.nccl_cross_built = true;
        Ok(())
    }

    /// Packet allreduce, building the packet backend on first use.
    fn packet_call<T: Element>(
        &self,
        kernel: PacketKernel,
        input: u64,
        output: u64,
        len: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        self.with_gpu(|gpu| {
            self.ensure_packet(gpu)?;
            let packet = gpu.packet.as_ref().expect("built above");
            // SAFETY: as for the custom kernels: cudarc slices of `len` elements of T on this
            // context, kept alive and stream-ordered by the caller's guards.
            unsafe { packet.all_reduce(stream, kernel, T::DTYPE, input, output, len) }
        })
    }

    /// NCCL allreduce, building the communicator on first use. An aborted NCCL communicator
    /// (timeout, NCCL error) poisons the GPU side.
    fn nccl_call<T: Element>(&self, input: u64, output: u64, len: usize, stream: &Arc<CudaStream>) -> Result<()> {
        self.with_gpu(|gpu| {
            self.ensure_nccl(gpu)?;
            let nccl = gpu.nccl.as_mut().expect("built above");
            // SAFETY: as for the custom kernels: cudarc slices of `len` elements of T on this
            // context, kept alive and stream-ordered by the caller's guards.
            let result = unsafe { nccl.all_reduce(stream, T::DTYPE, input, output, len) };
            poison_on_abort(&mut gpu.poisoned, nccl, result)
        })
    }

    /// The message in consecutive chunks of at most the staging size, each an ordinary custom
    /// call chosen by the dispatch table. Chunk boundaries fall on 16-byte multiples, so every
    /// chunk keeps the alignment of the whole; each element is summed in rank order by its
    /// chunk's kernel, so the bits are those of one unchunked call.
    fn chunked_call<T: Element>(
        &self,
        input: u64,
        output: u64,
        len: usize,
        stream: &Arc<CudaStream>,
        registered_only: bool,
    ) -> Result<()> {
        let align = crate::cuda::protocol::ALIGN;
        let chunk = (self.config.custom_max_bytes / align * align / size_of::<T>()).max(1);
        // Chunks are node-local calls: across nodes (the hierarchy's node steps) they are chosen
        // for the node's ranks.
        let (table, world) = if self.boot.nodes > 1 {
            (DispatchTable::new(&self.config, self.boot.nranks_per_node), self.boot.nranks_per_node)
        } else {
            (self.dispatch_table(), self.boot.size)
        };
        let mut start = 0;
        while start < len {
            let n = chunk.min(len - start);
            let offset = (start * size_of::<T>()) as u64;
            let request = Request {
                nccl_available: false,
                ..Request::new(n * size_of::<T>(), T::DTYPE, world, 1, Memory::Device)
            };
            let algo = table.choose_chunk(&request)?;
            self.run_device::<T>(algo, input + offset, output + offset, n, stream, registered_only)?;
            start += n;
        }
        Ok(())
    }

    /// Allocate `len` elements of device memory every peer maps, registered for zero-copy
    /// allreduces. The memory stays allocated until the communicator is dropped (peers keep it
    /// mapped), even when the returned buffer is dropped earlier.
    ///
    /// # Collective
    /// Every rank, same `len` and `T`, in the same order.
    ///
    /// # Errors
    /// [`Error::Cuda`] when allocation or IPC fails (on every rank), [`Error::Mismatch`] when
    /// ranks ask for different sizes.
    pub fn alloc_shared<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.with_gpu(|gpu| {
            self.ensure_custom(gpu)?;
            let buf = DeviceBuffer::<T>::new(&gpu.ctx, len);
            let custom = gpu.custom.as_mut().expect("built above");
            let (ptr, bytes) = match &buf {
                Ok(b) => (b.device_address(), len * size_of::<T>()),
                Err(_) => (0, 0),
            };
            // Registration agrees across ranks before it fails, so a local allocation failure
            // reaches every rank.
            custom.register_buffer(self.boot.node(), ptr, bytes)?;
            let buf = buf?;
            gpu.shared.push(buf.mem.clone());
            Ok(buf)
        })
    }

    /// Allocate `len` elements of device memory that can be exported over IPC but is not
    /// registered: allreduces of it are staged, except inside [`Communicator::capture`], where
    /// the graph reads it in place. Not collective. As with [`Communicator::alloc_shared`], the
    /// memory is returned when the communicator is dropped (peers may map it).
    ///
    /// # Errors
    /// [`Error::Cuda`] when allocation fails.
    pub fn alloc_device<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.with_gpu(|gpu| {
            let buf = DeviceBuffer::new(&gpu.ctx, len)?;
            gpu.shared.push(buf.mem.clone());
            Ok(buf)
        })
    }

    /// Capture the work `body` enqueues on `stream` into a CUDA graph. Allreduces captured read
    /// their inputs in place where the memory allows it (registered, or from `cuMemAlloc`) and
    /// from the staging buffer otherwise; after capture every rank exchanges the addresses the
    /// captured calls read, so replays need no host work. `stream` must not be the legacy
    /// default stream. Capture runs in relaxed mode (tpcomm queries pointers during it). With
    /// cudarc's event tracking on (several streams in use), a buffer last touched on another
    /// stream makes the captured stream wait on that stream's event, which CUDA may refuse
    /// during capture: order such work first, or turn tracking off as `examples/gpu_check.rs`
    /// does. Calls served by NCCL are captured as NCCL nodes; NCCL's communicator is built by
    /// the first call it serves, which must not be a captured one: make one eager call of an
    /// NCCL-served size (or forced [`Algo::Nccl`]) before capturing such calls.
    ///
    /// After replaying the graph, synchronise the stream and call
    /// [`Communicator::check_device_errors`] to learn of peers that did not arrive.
    ///
    /// # Collective
    /// Every rank, capturing the same allreduce calls in the same order.
    ///
    /// # Errors
    /// [`Error::Mismatch`] when ranks captured different numbers of allreduces (do not replay);
    /// the error of `body` or of capture on any rank (every rank then fails).
    pub fn capture<F>(&self, stream: &Arc<CudaStream>, body: F) -> Result<CudaGraph>
    where
        F: FnOnce(&Arc<CudaStream>) -> Result<()>,
    {
        // Built before capture (they allocate and synchronise); NCCL alone may serve the
        // captured calls where the IPC kernels cannot run.
        self.with_gpu(|gpu| {
            let backends = self.device_backends(gpu)?;
            if backends.custom {
                self.ensure_packet(gpu)?;
            }
            if backends.custom && backends.nccl && self.boot.nodes > 1 && !self.config.deterministic {
                self.ensure_nccl_cross(gpu)?;
            }
            Ok(())
        })?;
        let begun = stream
            .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(crate::cuda::cuda("cuStreamBeginCapture"));
        let body_result = begun.and_then(|()| {
            let r = body(stream);
            let g = stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                .map_err(crate::cuda::cuda("cuStreamEndCapture / cuGraphInstantiate"));
            r.and(g)
        });
        let ok = u8::from(body_result.is_ok());
        let mut all_ok = 0u8;
        self.boot.world().all_reduce_into(&ok, &mut all_ok, mpi::collective::SystemOperation::min());
        self.with_gpu(|gpu| {
            if all_ok == 0 {
                // Nothing will be replayed; forget the calls recorded by this capture.
                if let Some(custom) = gpu.custom.as_mut() {
                    custom.discard_graph_pending();
                }
                return Err(match body_result {
                    Err(e) => e,
                    Ok(_) => Error::Unsupported {
                        what: "graph capture".into(),
                        reason: "capture failed on another rank (see its error)".into(),
                    },
                });
            }
            if let Some(custom) = gpu.custom.as_mut() {
                custom.exchange_graph_buffers(self.boot.node())?;
            }
            body_result?.ok_or_else(|| Error::invalid("capture", "the body enqueued no work on the stream"))
        })
    }

    /// Whether this rank's custom allreduce kernels were read from the disk cache
    /// (`TPCOMM_CACHE_DIR`) instead of compiled; `None` before the first device call.
    pub fn kernels_from_disk_cache(&self) -> Option<bool> {
        self.gpu.lock().ok()?.as_ref()?.custom.as_ref().map(|c| c.kernels_from_disk_cache())
    }

    /// Report a peer timeout recorded by device work since the last check (for example by a
    /// graph replay) as [`Error::PeerTimeout`]. Synchronise the stream first.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`]; [`Error::Mismatch`] when ranks replayed graphs of different
    /// calls; [`Error::Nccl`] for an asynchronous NCCL error (NCCL is then aborted);
    /// [`Error::Poisoned`] after an earlier desynchronising error.
    pub fn check_device_errors(&self) -> Result<()> {
        self.with_gpu(|gpu| {
            if let Some(c) = &gpu.custom {
                c.check_error()?;
            }
            if let Some(p) = &gpu.packet {
                p.check_error()?;
            }
            match gpu.nccl.as_mut() {
                Some(nccl) => nccl.check_error(),
                None => Ok(()),
            }
        })
    }
}

/// An NCCL call's result; an NCCL communicator that aborted (timeout, NCCL error) poisons the
/// GPU side, whose later calls then fail at once.
fn poison_on_abort(poisoned: &mut Option<String>, nccl: &NcclAllreduce, result: Result<()>) -> Result<()> {
    if let (Err(e), Some(_), true) = (&result, nccl.aborted(), poisoned.is_none()) {
        *poisoned = Some(e.to_string());
    }
    result
}
