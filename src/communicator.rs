//! The [`Communicator`]: the public face. It bootstraps over MPI, owns the host path and the
//! device side, and hands each call to them; every decision is the plan's, every mechanism a
//! backend's.

use crate::algo::Algo;
use crate::backend::host::{HostAllreduce, HostKernel};
use crate::bootstrap::{Bootstrap, Layout};
use crate::config::Config;
use crate::device::buffer::ReleaseQueue;
use crate::device::graph::{GraphRegistration, RegisteredGraph};
use crate::device::{DeviceCall, DeviceComm, DeviceSpec};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::exchange;
use crate::fault::GroupFault;
use crate::hierarchy::CrossNode;
use crate::norm::{Fusion, NormArgs};
use crate::plan::DispatchTable;
use crate::runtime::{Context, DevicePtr, DevicePtrMut, Stream, StreamRef};
use crate::DeviceBuffer;
use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// Per-call choices: a forced algorithm, or the zero-copy path only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallOptions {
    /// Force this algorithm for the call (`None`: the dispatch table, or `TPCOMM_ALGO`). A forced
    /// algorithm that cannot serve the call is an error on every rank, never a wrong result.
    pub algo: Option<Algo>,
    /// The input must lie in a buffer from [`Communicator::alloc_shared`]: read in place by the
    /// peers, never copied into a staging buffer (the seed's `all_reduce` without a staging
    /// buffer). Device calls only.
    pub registered_only: bool,
    /// Fused or split for [`Communicator::all_reduce_add_rms_norm`] (ignored elsewhere).
    pub norm: Fusion,
}

impl CallOptions {
    /// Force `algo`.
    pub fn algo(algo: Algo) -> Self {
        CallOptions { algo: Some(algo), ..CallOptions::default() }
    }
}

/// Builds a [`Communicator`], optionally on the application's GPU context.
///
/// In the default build (CUDA):
///
/// ```no_run
/// # fn main() -> tpcomm::Result<()> {
/// let universe = mpi::initialize().expect("MPI initialised twice");
/// let ctx = tpcomm::cudarc::driver::CudaContext::new(0)?; // the engine's own context
/// let comm = tpcomm::Communicator::builder(&universe.world()).context(ctx).build()?; // collective
/// # Ok(()) }
/// ```
pub struct CommunicatorBuilder<'a, C> {
    comm: &'a C,
    config: Option<Config>,
    device: Option<DeviceSpec>,
}

impl<'a, C: mpi::traits::Communicator> CommunicatorBuilder<'a, C> {
    /// Use `config` (default: [`Config::from_env`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Use the application's GPU context ([`crate::Context`]: cudarc's `CudaContext` in the
    /// default build, tpcomm's `HipDevice` in a ROCm build); `build` then also brings up the
    /// device side ([`Communicator::init_device`]).
    pub fn context(mut self, ctx: Arc<Context>) -> Self {
        self.device = Some(DeviceSpec::Context(ctx));
        self
    }

    /// Use the GPU of this ordinal; `build` then also brings up the device side.
    pub fn device(mut self, ordinal: usize) -> Self {
        self.device = Some(DeviceSpec::Ordinal(ordinal));
        self
    }

    /// Serve device calls with the CPU stand-in of the device backends (host memory through
    /// [`crate::testing`]); for tests without a GPU.
    #[doc(hidden)]
    pub fn mock_device(mut self) -> Self {
        self.device = Some(DeviceSpec::Mock);
        self
    }

    /// Bootstrap over the MPI communicator.
    ///
    /// # Collective
    /// Every rank of the MPI communicator, with the same configuration.
    ///
    /// # Errors
    /// As [`Communicator::new`], and as [`Communicator::init_device`] when a device was given.
    pub fn build(self) -> Result<Communicator> {
        let config = match self.config {
            Some(c) => c,
            None => Config::from_env()?,
        };
        let comm = Communicator::bootstrap(self.comm, config, self.device.clone().unwrap_or_default())?;
        if self.device.is_some() {
            comm.init_device()?;
        }
        Ok(comm)
    }
}

/// Lets another thread (an application's watchdog) stop every pending and later call of a
/// communicator: see [`Communicator::abort_handle`].
#[derive(Clone)]
pub struct AbortHandle {
    fault: Arc<GroupFault>,
}

impl AbortHandle {
    /// As [`Communicator::abort`], from any thread.
    pub fn abort(&self) {
        self.fault.abort();
    }
}

/// The host path: shared memory inside the node, MPI between nodes.
struct HostPath {
    host: HostAllreduce,
    cross: Option<CrossNode>,
}

/// Allreduce among the ranks of an MPI communicator.
///
/// Built collectively by [`Communicator::new`] or [`Communicator::builder`]. Every rank must
/// make the same collective calls in the same order. A communicator holds MPI handles, so it is
/// neither `Send` nor `Sync`: it stays on the thread that built it (as `mpi::initialize` sets
/// MPI up for one thread); [`AbortHandle`] reaches it from other threads.
///
/// Device calls only enqueue: an `Ok` says the call is on its stream. Errors of the device work
/// (a peer that never came, a mismatched call) surface at the next call, [`Communicator::poll`],
/// [`Communicator::synchronize`] or [`Communicator::finalize`]. After any error that leaves the
/// ranks out of step, every later call of every rank of the node returns [`Error::Poisoned`]
/// naming the first cause, and the results of calls enqueued since the last `Ok` of `poll` or
/// `synchronize` are undefined: abort, drop and build a new communicator.
pub struct Communicator {
    // Dropped first: the device side maps the fault page and the host path polls it.
    device: RefCell<Option<DeviceComm>>,
    host: RefCell<HostPath>,
    fault: Arc<GroupFault>,
    boot: Bootstrap,
    config: Config,
    table: RefCell<DispatchTable>,
    spec: DeviceSpec,
    finalized: Cell<bool>,
    /// The algorithm of this rank's last successful device call, and whether its norm was fused.
    last_device_call: Cell<Option<(Algo, bool)>>,
}

impl Communicator {
    /// Bootstrap over `comm` (the world or any split of it) with `config`. The device side is
    /// brought up by [`Communicator::init_device`] (or by a builder given a device).
    ///
    /// # Collective
    /// Every rank of `comm`, with the same configuration (settings that change the protocol must
    /// match; logging and cache settings may differ).
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings; [`Error::Mismatch`] when ranks run with different
    /// settings; [`Error::System`] when the node's shared memory cannot be made (a too small
    /// `/dev/shm`); [`Error::PeerTimeout`] when a rank does not arrive within `TPCOMM_TIMEOUT_MS`.
    ///
    /// # Examples
    /// See `examples/hello_allreduce.rs`.
    pub fn new<C: mpi::traits::Communicator>(comm: &C, config: Config) -> Result<Self> {
        Self::bootstrap(comm, config, DeviceSpec::Default)
    }

    /// A builder: configuration and the application's GPU context or device ordinal.
    pub fn builder<C: mpi::traits::Communicator>(comm: &C) -> CommunicatorBuilder<'_, C> {
        CommunicatorBuilder { comm, config: None, device: None }
    }

    fn bootstrap<C: mpi::traits::Communicator>(comm: &C, config: Config, spec: DeviceSpec) -> Result<Self> {
        config.validate()?;
        let boot = Bootstrap::new(comm, config.fake_nodes, config.timeout)?;
        check_same_config(&boot, &config)?;
        let t = boot.timeout;
        let l = &boot.layout;
        let fault = Arc::new(GroupFault::open(boot.node(), l.rank, t)?);
        let bytes = HostAllreduce::segment_bytes(l.ranks_per_node, config.host_chunk_bytes);
        let seg = crate::shm::node_segment(boot.node(), "host", bytes, t)?;
        let global_ranks: Vec<usize> = (0..l.size).filter(|&r| l.rank_to_node[r] == l.node_index()).collect();
        let host = HostAllreduce::new(seg, l.local_rank, global_ranks, config.host_chunk_bytes, t, fault.word())?;
        let cross = if l.nodes > 1 { Some(CrossNode::new(&boot)?) } else { None };
        if config.debug {
            log::info!("tpcomm: {}", l.summary());
        }
        let mut table = DispatchTable::new(&config, l.size);
        load_tuned_table(&boot, &config, &mut table)?;
        Ok(Communicator {
            device: RefCell::new(None),
            host: RefCell::new(HostPath { host, cross }),
            fault,
            boot,
            config,
            table: RefCell::new(table),
            spec,
            finalized: Cell::new(false),
            last_device_call: Cell::new(None),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.boot.layout.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.boot.layout.size
    }

    /// Where the ranks are (nodes, local ranks, rank_to_node, rank_to_ib).
    pub fn layout(&self) -> &Layout {
        &self.boot.layout
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dispatch table in force.
    pub fn dispatch_table(&self) -> DispatchTable {
        self.table.borrow().clone()
    }

    pub(crate) fn boot(&self) -> &Bootstrap {
        &self.boot
    }

    pub(crate) fn set_table(&self, table: DispatchTable) {
        *self.table.borrow_mut() = table;
    }

    /// Report `r`; an error that leaves the ranks out of step fails the group first, so every
    /// rank's next call (and every wait on this rank) stops. Errors that every rank meets alike
    /// before anything was sent (a forced algorithm that cannot serve the call, a missing
    /// backend, a bad setting) leave the communicator usable.
    fn settle<R>(&self, r: Result<R>) -> Result<R> {
        match r {
            Ok(v) => Ok(v),
            Err(e @ (Error::InvalidUsage { .. } | Error::Unsupported { .. } | Error::Config { .. })) => Err(e),
            Err(Error::Poisoned { cause }) => Err(Error::Poisoned { cause }),
            Err(e @ Error::PeerFailed { .. }) => Err(self.fault.check().err().unwrap_or(e)),
            Err(e) => {
                self.fault.raise(&e);
                Err(e)
            }
        }
    }

    /// A handle that stops this communicator from any thread ([`AbortHandle::abort`]).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle { fault: self.fault.clone() }
    }

    /// Stop every pending and later call of every rank of the node: every spinning kernel and
    /// host wait sees the fault word and leaves, and every later call returns
    /// [`Error::Poisoned`] (NCCL's `ncclCommAbort`). To recover: abort, drop the communicator on
    /// every rank, build a new one (from a fresh MPI communicator where ranks died).
    pub fn abort(&self) {
        self.fault.abort();
        if let Ok(mut dev) = self.device.try_borrow_mut() {
            if let Some(dev) = dev.as_mut() {
                dev.abort();
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Host memory.

    /// The algorithm the dispatch table picks for a host call of `len` elements of `T`.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] when `TPCOMM_ALGO` forces a device algorithm.
    pub fn host_algo<T: Element>(&self, len: usize) -> Result<Algo> {
        self.table.borrow().host(len, T::DTYPE, None)
    }

    /// Sum `input` over all ranks into `output` (host memory).
    ///
    /// # Collective
    /// Every rank, same length and element type.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `input` and `output` differ in length (the group is
    /// failed, so the peers stop at once); [`Error::Mismatch`] when ranks pass different lengths;
    /// [`Error::PeerTimeout`] when a peer does not call within `TPCOMM_TIMEOUT_MS`;
    /// [`Error::Poisoned`] after any of these on any rank of the node.
    ///
    /// # Examples
    /// See `examples/hello_allreduce.rs`.
    pub fn all_reduce_host<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_reduce_host_with(&CallOptions::default(), Some(input), output)
    }

    /// Sum `buf` over all ranks, in place (host memory).
    ///
    /// # Collective
    /// As [`Communicator::all_reduce_host`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_host`].
    pub fn all_reduce_host_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        self.all_reduce_host_with(&CallOptions::default(), None, buf)
    }

    /// Host allreduce with per-call options (`input = None`: in place).
    ///
    /// # Collective
    /// Every rank, same length, element type and options.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_host`]; [`Error::InvalidUsage`] for a device algorithm.
    pub fn all_reduce_host_with<T: Element>(
        &self,
        opts: &CallOptions,
        input: Option<&[T]>,
        output: &mut [T],
    ) -> Result<()> {
        self.fault.check()?;
        let algo = self.table.borrow().host(output.len(), T::DTYPE, opts.algo)?;
        if let Some(input) = input {
            if input.len() != output.len() {
                return self.settle(Err(Error::invalid(
                    "all_reduce_host",
                    format!("input has {} elements but output has {}", input.len(), output.len()),
                )));
            }
        }
        if self.config.debug && self.rank() == 0 {
            log::info!("tpcomm: host allreduce {} x {} -> {algo}", output.len(), T::DTYPE);
        }
        let kernel = if algo == Algo::HostOneShot { HostKernel::OneShot } else { HostKernel::TwoShot };
        let mut path = self.host.borrow_mut();
        let r = path.host.all_reduce(input, output, kernel).and_then(|()| {
            let HostPath { host, cross } = &mut *path;
            let Some(cross) = cross else { return Ok(()) };
            let len = output.len();
            cross.sum_across_nodes(&mut output[cross.my_shard(len)], self.config.timeout)?;
            host.all_gather_ranges(output, &cross.shard_ranges(len))
        });
        self.settle(r)
    }

    // ---------------------------------------------------------------------------------------
    // Device memory.

    /// Bring up the device side: this rank's GPU (the builder's context or ordinal, else
    /// `local_rank % visible devices`), the kernels (compiled or read from `TPCOMM_CACHE_DIR`),
    /// and every backend the layout allows (custom and packet kernels, NCCL), agreed over all
    /// ranks so every rank dispatches alike. Calling it again does nothing.
    ///
    /// # Collective
    /// Every rank; every wait in it is bounded by `TPCOMM_TIMEOUT_MS`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] without a CUDA driver (on every rank); [`Error::Cuda`];
    /// [`Error::PeerTimeout`] when a rank does not arrive.
    pub fn init_device(&self) -> Result<()> {
        self.fault.check()?;
        if self.device.borrow().is_some() {
            return Ok(());
        }
        let dev = DeviceComm::init(&self.boot, &self.config, &self.spec, &self.fault);
        *self.device.borrow_mut() = Some(self.settle(dev)?);
        Ok(())
    }

    fn with_device<R>(&self, f: impl FnOnce(&mut DeviceComm) -> Result<R>) -> Result<R> {
        self.fault.check()?;
        let mut dev = self.device.borrow_mut();
        let dev = dev.as_mut().ok_or_else(|| {
            Error::usage(
                "a device call",
                "the device side is not up: call Communicator::init_device() first (collective)",
            )
        })?;
        let r = f(dev);
        self.settle(r)
    }

    /// The context of this rank's GPU ([`crate::Context`]: cudarc's `CudaContext` in the
    /// default build, tpcomm's `HipDevice` in a ROCm build). Allocate streams and buffers
    /// from it.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] before [`Communicator::init_device`]; [`Error::Unsupported`] for
    /// the CPU stand-in.
    pub fn context(&self) -> Result<Arc<Context>> {
        let dev = self.device.borrow();
        let dev = dev.as_ref().ok_or_else(|| Error::usage("context", "call Communicator::init_device() first"))?;
        dev.context().cloned().ok_or_else(|| Error::Unsupported {
            what: "the device context".into(),
            reason: "this communicator's device side is the CPU stand-in".into(),
        })
    }

    /// The CUDA context of this rank's GPU: the same as [`Communicator::context`] (the name
    /// the CUDA build has always had; a ROCm build names it `context` only).
    ///
    /// # Errors
    /// As [`Communicator::context`].
    #[cfg(not(feature = "rocm"))]
    pub fn cuda_context(&self) -> Result<Arc<Context>> {
        self.context()
    }

    /// The algorithm that served this rank's last successful device call (what `TPCOMM_DEBUG`
    /// logs for it), `None` before the first: unlike [`Communicator::device_algo`] it knows the
    /// call's buffers, which decide some choices (registered or captured buffers every peer
    /// reaches take the two-shot kernel above `TPCOMM_CUSTOM_MAX_BYTES`).
    pub fn last_device_algo(&self) -> Option<Algo> {
        self.last_device_call.get().map(|(algo, _)| algo)
    }

    /// Whether this rank's last successful device call ran its residual add + RMSNorm fused
    /// into the allreduce (`false` for a split call and for a plain allreduce), `None` before
    /// the first: like [`Communicator::last_device_algo`] it knows the call's buffers, which
    /// decide whether the fused two-shot can serve.
    pub fn last_norm_fused(&self) -> Option<bool> {
        self.last_device_call.get().map(|(_, fused)| fused)
    }

    /// The algorithm the dispatch picks for a device call of `len` elements of `T` with aligned
    /// pointers (what `TPCOMM_DEBUG` would log for it).
    ///
    /// # Errors
    /// As the call itself would fail in dispatch; [`Error::InvalidUsage`] before `init_device`.
    pub fn device_algo<T: Element>(&self, len: usize) -> Result<Algo> {
        self.plan_device(len, T::DTYPE, false, None).map(|p| p.algo)
    }

    /// As [`Communicator::device_algo`] for a call in place (input and output the same buffer),
    /// which the dispatch may serve otherwise: one-shot in place would stage its input.
    ///
    /// # Errors
    /// As [`Communicator::device_algo`].
    pub fn device_algo_in_place<T: Element>(&self, len: usize) -> Result<Algo> {
        self.plan_device(len, T::DTYPE, true, None).map(|p| p.algo)
    }

    /// The plan of a device call with aligned pointers.
    pub(crate) fn plan_device(
        &self,
        len: usize,
        dtype: DType,
        in_place: bool,
        norm: Option<crate::plan::NormRequest>,
    ) -> Result<crate::plan::Plan> {
        let table = self.table.borrow().clone();
        self.with_device(|d| d.plan(&self.boot, &table, len, dtype, true, in_place, None, false, norm))
    }

    /// Refuse a call for a local reason (a bad argument): every rank's later calls stop too,
    /// unless the error is one every rank meets alike.
    pub(crate) fn refuse<R>(&self, e: Error) -> Result<R> {
        self.fault.check()?;
        self.settle(Err(e))
    }

    /// Sum `input` over all ranks into `output` (device memory: f32, f16 or bf16; f64 through
    /// NCCL), on `stream`. Only enqueues: the host does not wait for the GPU.
    ///
    /// The dispatch table picks the algorithm: one rank copies; the packet kernels up to
    /// `TPCOMM_PACKET_MAX_BYTES` (every rank pushes its own data: nothing needs registering);
    /// the custom IPC kernels up to `TPCOMM_CUSTOM_MAX_BYTES` (an input inside a buffer from
    /// [`Communicator::alloc_shared`] is read in place by the peers, any other is first copied
    /// into this rank's staging buffer); NCCL above, for misaligned pointers, and where the GPUs
    /// lack P2P; the hierarchy (`hier`) when the ranks span nodes; chunked IPC calls in
    /// deterministic mode or without NCCL. Inside a CUDA graph capture the call is recorded,
    /// under the open [`GraphRegistration`] (a capture without one is refused).
    ///
    /// # Collective
    /// Every rank, same length and element type.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for different input and output lengths, or misaligned pointers
    /// where NCCL cannot take them; [`Error::InvalidUsage`] before `init_device`, inside a
    /// capture without a registration, or for a forced algorithm that cannot serve the call;
    /// [`Error::Unsupported`] where no backend built here can serve it; the errors of earlier
    /// device work ([`Error::PeerTimeout`], [`Error::Mismatch`], [`Error::Nccl`]); after any of
    /// the desynchronising ones, [`Error::Poisoned`].
    ///
    /// # Examples
    /// ```no_run
    /// # fn main() -> tpcomm::Result<()> {
    /// let universe = mpi::initialize().expect("MPI initialised twice");
    /// let comm = tpcomm::Communicator::new(&universe.world(), tpcomm::Config::from_env()?)?;
    /// comm.init_device()?; // collective
    /// let stream = comm.cuda_context()?.new_stream()?;
    /// let len = 1 << 20;
    /// let mut x = comm.alloc_shared::<tpcomm::bf16>(len)?; // collective: registered, zero-copy
    /// stream.memcpy_htod(&vec![tpcomm::bf16::from_f32(1.0); len], &mut x)?;
    /// let mut y = stream.alloc_zeros::<tpcomm::bf16>(len)?;
    /// comm.all_reduce(&x, &mut y, &stream)?; // collective: every rank; enqueued only
    /// comm.all_reduce_in_place(&mut x, &stream)?;
    /// comm.synchronize(&stream)?; // the results are there, and every error so far reported
    /// # Ok(()) }
    /// ```
    /// More in `examples/gpu_check` and `examples/allreduce_perf.rs`.
    pub fn all_reduce<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &self,
        input: &I,
        output: &mut O,
        stream: &Stream,
    ) -> Result<()> {
        self.all_reduce_with(&CallOptions::default(), input, output, stream)
    }

    /// Sum `buf` over all ranks, in place (device memory).
    ///
    /// # Collective
    /// As [`Communicator::all_reduce`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    pub fn all_reduce_in_place<T: Element, B: DevicePtrMut<T>>(&self, buf: &mut B, stream: &Stream) -> Result<()> {
        self.all_reduce_in_place_with(&CallOptions::default(), buf, stream)
    }

    /// As [`Communicator::all_reduce`] with per-call options.
    ///
    /// # Collective
    /// Every rank, same length, element type and options.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`]; [`Error::InvalidArgument`] for an input outside
    /// registered memory with [`CallOptions::registered_only`].
    pub fn all_reduce_with<T: Element, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &self,
        opts: &CallOptions,
        input: &I,
        output: &mut O,
        stream: &Stream,
    ) -> Result<()> {
        if input.len() != output.len() {
            self.fault.check()?;
            return self.settle(Err(Error::invalid(
                "all_reduce",
                format!("input has {} elements but output has {}", input.len(), output.len()),
            )));
        }
        let len = output.len();
        let (inp, _read) = input.device_ptr(stream);
        let (out, _write) = output.device_ptr_mut(stream);
        // SAFETY: both addresses come from device memory of `len` elements of T, kept
        // alive (and their stream order recorded) by the guards above until the call is
        // enqueued; the kernels read and write them in stream order.
        unsafe { self.device_call(opts, inp, out, len, T::DTYPE, StreamRef::Device(stream), None) }
    }

    /// As [`Communicator::all_reduce_in_place`] with per-call options.
    ///
    /// # Collective
    /// Every rank, same length, element type and options.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_with`].
    pub fn all_reduce_in_place_with<T: Element, B: DevicePtrMut<T>>(
        &self,
        opts: &CallOptions,
        buf: &mut B,
        stream: &Stream,
    ) -> Result<()> {
        let len = buf.len();
        let (p, _write) = buf.device_ptr_mut(stream);
        // SAFETY: as in all_reduce_with.
        unsafe { self.device_call(opts, p, p, len, T::DTYPE, StreamRef::Device(stream), None) }
    }

    /// # Safety
    /// `input` and `output` are valid for `len` elements of `dtype` in the memory `stream`
    /// reaches, until the call ran; so are `norm`'s buffers (of `len` elements, its weight of
    /// `hidden`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn device_call(
        &self,
        opts: &CallOptions,
        input: u64,
        output: u64,
        len: usize,
        dtype: DType,
        stream: StreamRef,
        norm: Option<NormArgs>,
    ) -> Result<()> {
        let table = self.table.borrow();
        let call = DeviceCall {
            input,
            output,
            len,
            dtype,
            stream,
            forced: opts.algo,
            registered_only: opts.registered_only,
            norm,
        };
        // SAFETY: the caller's contract.
        let served = self.with_device(|d| unsafe { d.all_reduce(&self.boot, &table, &call) })?;
        self.last_device_call.set(Some(served));
        Ok(())
    }

    /// Exchange one flag with every peer on the GPU and wait for theirs: the floor of any
    /// cross-rank device call (a packet call of no data), which `allreduce_perf --floor` prints
    /// beside every latency. Recorded instead when `stream` captures (under a registration).
    ///
    /// # Collective
    /// Every rank.
    ///
    /// # Errors
    /// [`Error::Unsupported`] without the packet kernels; as [`Communicator::all_reduce`].
    pub fn exchange_flags(&self, stream: &Stream) -> Result<()> {
        self.with_device(|d| d.exchange_flags(StreamRef::Device(stream)))
    }

    /// Report errors of device work enqueued so far (kernel timeouts and mismatches recorded in
    /// mapped memory, NCCL's asynchronous errors, the group's failure state). Cheap and
    /// non-blocking: `Ok` says nothing about work that has not run yet.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`], [`Error::Mismatch`], [`Error::Nccl`], [`Error::Poisoned`].
    pub fn poll(&self) -> Result<()> {
        self.fault.check()?;
        if self.device.borrow().is_none() {
            return Ok(());
        }
        self.with_device(|d| d.poll())
    }

    /// Wait until `stream`'s work is done, then report every error of the device work so far.
    /// Bounded: tpcomm's kernels end their own waits, and an NCCL call pending past the timeout
    /// is aborted while this waits.
    ///
    /// # Errors
    /// As [`Communicator::poll`]; [`Error::Cuda`] when the stream failed.
    pub fn synchronize(&self, stream: &Stream) -> Result<()> {
        self.with_device(|d| d.synchronize(StreamRef::Device(stream)))
    }

    /// The same as [`Communicator::poll`] (kept for code written against earlier versions).
    ///
    /// # Errors
    /// As [`Communicator::poll`].
    pub fn check_device_errors(&self) -> Result<()> {
        self.poll()
    }

    /// Allocate `len` elements of device memory every peer maps, registered for zero-copy
    /// allreduces (and zeroed). Dropping the buffer returns the memory at the next collective
    /// point (`alloc_shared`, a registration's `finish`, `finalize`) once every rank dropped
    /// its buffer of the same allocation.
    ///
    /// # Collective
    /// Every rank, same `len` and `T`, in the same order.
    ///
    /// # Errors
    /// [`Error::Cuda`] when allocation or IPC fails (on every rank); [`Error::Mismatch`] when
    /// ranks ask for different sizes; [`Error::PeerTimeout`].
    pub fn alloc_shared<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.with_device(|d| d.alloc_shared(&self.boot, len))
    }

    /// Allocate `len` elements of zeroed device memory that can be exported over IPC but is not
    /// registered: eager allreduces of it are staged, graphs captured under a registration read
    /// it in place. Not collective. Returned when the communicator is finalized or dropped
    /// (peers may map it for a graph).
    ///
    /// # Errors
    /// [`Error::Cuda`] when allocation fails.
    pub fn alloc_device<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.with_device(|d| d.alloc_device(len))
    }

    /// Open a graph registration: allreduces captured (by the application's own
    /// `begin_capture`/`end_capture`) until [`GraphRegistration::finish`] are registered with
    /// every peer then. Not collective; `finish` is. See [`crate::GraphRegistration`].
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] while another registration is open or before `init_device`.
    pub fn begin_graph_registration(&self) -> Result<GraphRegistration<'_>> {
        let reg = self.with_device(|d| d.begin_registration())?;
        Ok(GraphRegistration::new(self, reg))
    }

    pub(crate) fn finish_registration(&self, reg: u64, captured: Result<()>) -> Result<ReleaseQueue> {
        self.with_device(|d| d.finish_registration(&self.boot, reg, captured).map(|()| d.releases()))
    }

    pub(crate) fn abandon_registration(&self, reg: u64) {
        if let Ok(mut dev) = self.device.try_borrow_mut() {
            if let Some(dev) = dev.as_mut() {
                dev.release_registration(reg);
            }
        }
    }

    /// Capture the work `body` enqueues on `stream` into a registered CUDA graph: a registration,
    /// `begin_capture` (relaxed mode), `body`, `end_capture`, `finish`. Replay it with
    /// [`RegisteredGraph::launch`]; errors of replays surface at [`Communicator::poll`].
    ///
    /// # Collective
    /// Every rank, capturing the same allreduce calls in the same order.
    ///
    /// # Errors
    /// The error of `body` or of capture on this rank, [`Error::PeerFailed`] when they failed on
    /// another; as [`GraphRegistration::finish`].
    pub fn capture<F>(&self, stream: &Arc<Stream>, body: F) -> Result<RegisteredGraph>
    where
        F: FnOnce(&Arc<Stream>) -> Result<()>,
    {
        let reg = self.begin_graph_registration()?;
        let mut local = crate::runtime::begin_capture(stream);
        let mut graph = None;
        if local.is_ok() {
            local = body(stream);
            match crate::runtime::end_capture(stream) {
                Ok(Some(g)) => graph = Some(g),
                Ok(None) => {
                    local = local.and(Err(Error::invalid("capture", "the body enqueued no work on the stream")))
                }
                Err(e) => local = local.and(Err(e)),
            }
        }
        let finished = reg.finish(if local.is_ok() { graph } else { None });
        match (local, finished) {
            (Err(e), _) => Err(e),
            (Ok(()), r) => r,
        }
    }

    /// A readable report of the node's GPUs as tpcomm sees them: one line per rank, P2P and
    /// NVLink per pair, and the layout verdict.
    ///
    /// # Collective
    /// Every rank of the node.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] before `init_device`; [`Error::PeerTimeout`].
    pub fn topology_report(&self) -> Result<String> {
        let ctx = self.context()?;
        crate::topology::link_report(self.boot.node(), &ctx, self.boot.timeout)
    }

    /// Time the candidate algorithms on this machine and move the dispatch thresholds to the
    /// measured crossovers (see `src/tune.rs`). With `TPCOMM_TUNE_FILE` set, rank 0 also saves
    /// the table there, and later communicators load it instead of tuning again.
    ///
    /// # Collective
    /// Every rank, with no other call in flight.
    ///
    /// # Errors
    /// Any error of the timed calls; [`Error::System`] when the file cannot be written.
    pub fn tune(&self) -> Result<DispatchTable> {
        crate::tune::tune(self)
    }

    /// Finish every pending device call (bounded), then wait (bounded) until every rank got
    /// here, so no rank frees memory a slower peer still reads; the device side is gone after.
    /// [`Drop`] does this when it was not done.
    ///
    /// # Collective
    /// Every rank.
    ///
    /// # Errors
    /// The first error of pending device work; [`Error::PeerTimeout`] when a rank does not come.
    pub fn finalize(&self) -> Result<()> {
        if self.finalized.replace(true) {
            return Ok(());
        }
        let boot = &self.boot;
        // After a failure the peers may be gone: abort what is pending and give the live ones a
        // moment to arrive, not the whole timeout.
        let failed = self.fault.check().is_err();
        let wait = if failed { boot.timeout.min(std::time::Duration::from_secs(1)) } else { boot.timeout };
        let taken = self.device.borrow_mut().take();
        match taken {
            Some(mut dev) => dev.finalize(boot, wait, failed),
            None => exchange::barrier(boot.world(), wait, "finalize"),
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Err(e) = self.finalize() {
            log::warn!("tpcomm: rank {}: finalizing at drop: {e}", self.rank());
        }
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
    if boot.layout.rank == 0 && path.exists() {
        blob = match std::fs::read(path) {
            Ok(text) => [&[1u8][..], &text].concat(),
            Err(e) => [&[2u8][..], e.to_string().as_bytes()].concat(),
        };
    }
    exchange::broadcast_bytes(boot.world(), 0, &mut blob, boot.timeout, "loading the tuned dispatch table")?;
    let body = String::from_utf8_lossy(blob.get(1..).unwrap_or(&[]));
    match blob.first() {
        Some(1) => crate::tune_file::load(table, &body, path, &crate::tune::tune_key(boot), config)?,
        Some(2) => {
            return Err(Error::System {
                op: format!("reading tuned dispatch table {} on rank 0", path.display()),
                source: std::io::Error::other(body.into_owned()),
            })
        }
        _ => {}
    }
    Ok(())
}

/// Every rank must run with the same protocol settings (differing chunk sizes or algorithms
/// would make ranks disagree about shared memory); logging and cache settings may differ. Every
/// rank compares with rank 0's, so all of them fail together and name the same rank.
fn check_same_config(boot: &Bootstrap, config: &Config) -> Result<()> {
    let mine = config.protocol_dump();
    let all = exchange::all_gather_bytes(boot.world(), mine.as_bytes(), boot.timeout, "comparing configurations")?;
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        if *theirs != all[0] {
            let (a, b) = (String::from_utf8_lossy(&all[0]), String::from_utf8_lossy(theirs));
            let differs: Vec<String> = a
                .lines()
                .zip(b.lines())
                .filter(|(x, y)| x != y)
                .map(|(x, y)| format!("rank 0: {x} / rank {rank}: {y}"))
                .collect();
            return Err(Error::Mismatch {
                op: "Communicator::new",
                detail: format!("ranks run with different TPCOMM_* settings: {}", differs.join("; ")),
            });
        }
    }
    Ok(())
}
