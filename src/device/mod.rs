//! The device side of a communicator: the backend set built once, plan execution, graph
//! registration and the memory tpcomm allocates.
//!
//! [`DeviceComm`] takes what it needs (the bootstrap, the configuration, the dispatch table) as
//! arguments and never calls back into the [`crate::Communicator`], which is a thin face over it.
//!
//! Every device call only enqueues. Failures of device work (a kernel that timed out waiting for
//! a peer, a mismatched call, NCCL's asynchronous errors) are recorded where [`DeviceComm::poll`]
//! finds them: the next call, `poll()`, `synchronize()` and `finalize()` report them, like NCCL's
//! asynchronous errors. `TPCOMM_SYNC_CALLS=1` (debugging) makes every eager call wait for its
//! result and report its own errors.

pub(crate) mod backend_set;
pub(crate) mod buffer;
pub(crate) mod execute;
pub(crate) mod graph;
pub(crate) mod norm;

use crate::algo::{Algo, BackendKind};
use crate::backend::custom::FaultTarget;
use crate::backend::{Call, RegId};
use crate::bootstrap::Bootstrap;
use crate::config::Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exchange;
use crate::fault::GroupFault;
use crate::plan::{DispatchTable, Group, Request, Shape};
use crate::runtime::ipc::IpcBuffer;
use crate::runtime::{self, protocol, Context, MappedHostPage, Stream, StreamRef};
use backend_set::BackendSet;
use buffer::{DeviceBuffer, Release, ReleaseQueue};
use std::collections::HashMap;
use std::sync::Arc;

/// Which GPU a communicator uses.
#[derive(Clone, Default)]
pub(crate) enum DeviceSpec {
    /// `local_rank % visible devices`.
    #[default]
    Default,
    /// This device ordinal.
    Ordinal(usize),
    /// The application's context.
    Context(Arc<Context>),
    /// No GPU: the CPU stand-in of the device backends (tests).
    Mock,
}

/// One device call as the face hands it over.
pub(crate) struct DeviceCall<'a> {
    pub input: u64,
    pub output: u64,
    pub len: usize,
    pub dtype: DType,
    pub stream: StreamRef<'a>,
    pub forced: Option<Algo>,
    pub registered_only: bool,
    /// Residual add + RMSNorm after the sum (`output` is `norm_out`).
    pub norm: Option<crate::norm::NormArgs>,
}

/// Orders calls made on different streams (calls of one communicator must not run at the same
/// time: their kernels share counters and buffers). A call on another stream than the previous
/// call first waits, on the host, until the context's work so far is done: rare in practice
/// (engines keep collectives on one stream), and it costs the common case nothing, where an
/// event recorded after every call would cost every call. The wait is bounded: tpcomm's kernels
/// end their own waits.
struct StreamOrder {
    ctx: Arc<Context>,
    last: usize,
}

impl StreamOrder {
    fn before(&mut self, stream: &Stream) -> Result<()> {
        let id = runtime::stream_id(stream);
        if self.last != 0 && self.last != id {
            runtime::synchronize(&self.ctx, "synchronize (a call on another stream)")?;
        }
        self.last = id;
        Ok(())
    }
}

/// Where kernels find the group's fault word.
enum FaultMapping {
    /// The node's fault page, registered with the driver.
    Page(#[allow(dead_code)] MappedHostPage),
    /// A device word nobody raises (the page could not be registered): kernels still stop on
    /// their own timeouts, hosts still see the page.
    Private(#[allow(dead_code)] IpcBuffer),
    /// No GPU.
    None,
}

/// The device side of a communicator.
pub(crate) struct DeviceComm {
    ctx: Option<Arc<Context>>,
    set: BackendSet,
    _fault: FaultMapping,
    order: Option<StreamOrder>,
    releases: ReleaseQueue,
    /// Buffers this rank released that not every rank has released yet.
    releasing: Vec<u64>,
    /// `alloc_shared` buffers alive, by id.
    shared: HashMap<u64, Arc<IpcBuffer>>,
    /// `alloc_device` buffers: freed with the communicator (peers may map them for graphs).
    private: Vec<Arc<IpcBuffer>>,
    next_id: u64,
    open_registration: Option<RegId>,
    /// The split path's add + norm kernel (loaded at its first use).
    norm: norm::NormKernel,
    sync_calls: bool,
    debug: bool,
}

impl DeviceComm {
    /// Bring up the device side: the GPU's context, the fault page's mapping, and every backend
    /// the layout allows.
    ///
    /// # Collective
    /// Every rank, with the same configuration.
    ///
    /// # Errors
    /// [`Error::Unsupported`] without a usable GPU of this build's vendor (on every rank); the
    /// vendor's error ([`Error::Cuda`], [`Error::Hip`]);
    /// [`Error::PeerTimeout`] when a rank does not arrive within the timeout.
    pub(crate) fn init(boot: &Bootstrap, config: &Config, spec: &DeviceSpec, fault: &GroupFault) -> Result<Self> {
        const STEP: &str = "init_device";
        let t = boot.timeout;
        let releases = ReleaseQueue::default();
        let base = |ctx, set, fault, order| DeviceComm {
            ctx,
            set,
            _fault: fault,
            order,
            releases: releases.clone(),
            releasing: Vec::new(),
            shared: HashMap::new(),
            private: Vec::new(),
            next_id: 1,
            open_registration: None,
            norm: norm::NormKernel::new(config.cache_dir()),
            sync_calls: config.sync_calls,
            debug: config.debug,
        };
        if let DeviceSpec::Mock = spec {
            let set = BackendSet::mock(boot, config, fault.word())?;
            return Ok(base(None, set, FaultMapping::None, None));
        }
        let ctx = exchange::agree(boot.world(), open_context(boot, spec), t, STEP)?;
        let (mapping, target) = map_fault(&ctx, boot, fault)?;
        let order = StreamOrder { ctx: ctx.clone(), last: 0 };
        let set = BackendSet::build(boot, config, &ctx, target)?;
        if config.debug {
            for note in &set.notes {
                log::info!("tpcomm: rank {}: {note}", boot.layout.rank);
            }
        }
        Ok(base(Some(ctx), set, mapping, Some(order)))
    }

    /// The GPU's context (`None` for the CPU stand-in).
    pub(crate) fn context(&self) -> Option<&Arc<Context>> {
        self.ctx.as_ref()
    }

    /// The plan of a device call of `len` elements of `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan(
        &self,
        boot: &Bootstrap,
        table: &DispatchTable,
        len: usize,
        dtype: DType,
        aligned: bool,
        in_place: bool,
        forced: Option<Algo>,
        peer_rows: bool,
        norm: Option<crate::plan::NormRequest>,
    ) -> Result<crate::plan::Plan> {
        let l = &boot.layout;
        let shape = Shape {
            world: l.size,
            nodes: l.nodes,
            local_rank: l.local_rank,
            ranks_per_node: l.ranks_per_node,
            min_ranks_per_node: l.min_ranks_per_node(),
        };
        table.device(&Request { len, dtype, shape, caps: &self.set.caps, aligned, in_place, forced, peer_rows, norm })
    }

    /// Enqueue one allreduce; returns the algorithm that served it and whether its norm (if it
    /// carries one) was fused into it.
    ///
    /// # Safety
    /// `call`'s addresses are valid for `call.len` elements of `call.dtype` in the memory its
    /// stream reaches, and not written by other work until the call (or a replay of its capture)
    /// ran.
    ///
    /// # Collective
    /// Every rank, same length, dtype and algorithm.
    pub(crate) unsafe fn all_reduce(
        &mut self,
        boot: &Bootstrap,
        table: &DispatchTable,
        call: &DeviceCall,
    ) -> Result<(Algo, bool)> {
        self.release_graphs();
        // Errors of earlier device work come first: nothing new is enqueued after a failure.
        self.poll()?;
        let capture = match (call.stream.is_capturing()?, self.open_registration) {
            (false, _) => None,
            (true, Some(reg)) => Some(reg),
            (true, None) => {
                return Err(Error::usage(
                    "an allreduce inside CUDA graph capture",
                    "captured calls must be registered so every rank learns the addresses they read: capture \
                     between Communicator::begin_graph_registration() and GraphRegistration::finish(), or use \
                     Communicator::capture()",
                ))
            }
        };
        let align = protocol::ALIGN as u64;
        let aligned = call.input % align == 0 && call.output % align == 0;
        let in_place = call.input == call.output;
        let norm = call.norm.map(|n| crate::plan::NormRequest { hidden: n.hidden, fusion: n.fusion });
        let c = Call {
            input: call.input,
            output: call.output,
            len: call.len,
            dtype: call.dtype,
            stream: call.stream,
            capture,
            registered_only: call.registered_only,
            norm: call.norm,
        };
        // Whether every peer reaches this call's buffers in place: the custom backend knows.
        let peer_rows = match self.set.get(BackendKind::Custom, Group::Node) {
            Ok(custom) => custom.reads_in_place(&c),
            Err(_) => false,
        };
        let plan = self.plan(boot, table, call.len, call.dtype, aligned, in_place, call.forced, peer_rows, norm)?;
        if self.debug && boot.layout.rank == 0 {
            let what = if norm.is_some() { "allreduce + RMSNorm" } else { "allreduce" };
            log::info!("tpcomm: device {what} {} x {} -> {} ({})", call.len, call.dtype, plan.algo, plan.reason);
        }
        let cuda_stream = match call.stream {
            StreamRef::Device(s) if capture.is_none() => Some(s),
            _ => None,
        };
        if let (Some(s), Some(order)) = (cuda_stream, self.order.as_mut()) {
            order.before(s)?;
        }
        // SAFETY: the caller's contract.
        unsafe { execute::execute(&mut self.set, &mut self.norm, self.ctx.as_ref(), &plan, &c) }?;
        if self.sync_calls && cuda_stream.is_some() {
            self.synchronize(call.stream)?;
        }
        Ok((plan.algo, plan.fused()))
    }

    /// One flag to and from every peer (a packet call of no data): the floor of any cross-rank
    /// call.
    ///
    /// # Collective
    /// Every rank.
    ///
    /// # Errors
    /// [`Error::Unsupported`] without the packet kernels; as [`DeviceComm::all_reduce`].
    pub(crate) fn exchange_flags(&mut self, stream: StreamRef) -> Result<()> {
        self.poll()?;
        if !self.set.caps.has(BackendKind::Packet, Group::Node) {
            return Err(Error::Unsupported {
                what: "the flag-exchange floor".into(),
                reason: self.set.caps.why_missing(BackendKind::Packet).to_string(),
            });
        }
        let capture = if stream.is_capturing()? { self.open_registration } else { None };
        let call = Call {
            input: 0,
            output: 0,
            len: 0,
            dtype: DType::BF16,
            stream,
            capture,
            registered_only: false,
            norm: None,
        };
        // SAFETY: no element is read or written (length 0).
        unsafe { self.set.get(BackendKind::Packet, Group::Node)?.enqueue(Algo::Packet, &call) }
    }

    /// Report errors recorded by device work enqueued so far; cheap, never waits.
    ///
    /// # Errors
    /// The first backend's error.
    pub(crate) fn poll(&mut self) -> Result<()> {
        self.set.all().try_for_each(|b| b.poll())
    }

    /// Wait until `stream`'s work is done, then report errors. Bounded: tpcomm's kernels end
    /// their own waits, and a pending NCCL call past the timeout is aborted while this waits.
    ///
    /// # Errors
    /// As [`DeviceComm::poll`]; [`Error::Cuda`] when the stream failed.
    pub(crate) fn synchronize(&mut self, stream: StreamRef) -> Result<()> {
        if let StreamRef::Device(s) = stream {
            let mut polls = 0;
            while !runtime::stream_done(s, "stream query (synchronize)")? {
                self.poll()?;
                exchange::backoff(&mut polls);
            }
        }
        self.poll()
    }

    /// Start a graph registration.
    ///
    /// # Errors
    /// [`Error::InvalidUsage`] while another registration is open; a backend's error.
    pub(crate) fn begin_registration(&mut self) -> Result<RegId> {
        if self.open_registration.is_some() {
            return Err(Error::usage(
                "begin_graph_registration",
                "another registration is still open; finish it first",
            ));
        }
        self.release_graphs();
        let reg = self.next_id();
        for b in self.set.all() {
            b.graph_begin(reg)?;
        }
        self.open_registration = Some(reg);
        Ok(reg)
    }

    /// End a registration: agree that every rank captured, then let every backend exchange what
    /// the captured calls read.
    ///
    /// # Collective
    /// Every rank, after capturing the same calls.
    ///
    /// # Errors
    /// [`Error::PeerFailed`] when capture failed on another rank; [`Error::Mismatch`] when ranks
    /// captured different calls; [`Error::PeerTimeout`].
    pub(crate) fn finish_registration(&mut self, boot: &Bootstrap, reg: RegId, captured: Result<()>) -> Result<()> {
        if self.open_registration != Some(reg) {
            return Err(Error::Internal(format!("registration {reg} is not the open one")));
        }
        self.open_registration = None;
        let result = exchange::agree(boot.world(), captured, boot.timeout, "GraphRegistration::finish")
            .and_then(|()| self.set.all().try_for_each(|b| b.graph_end(reg)));
        if result.is_err() {
            self.release_registration(reg);
        }
        result?;
        self.release_shared(boot)
    }

    /// Forget a registration whose graph is gone (or that was never finished). Local.
    pub(crate) fn release_registration(&mut self, reg: RegId) {
        if self.open_registration == Some(reg) {
            self.open_registration = None;
        }
        for b in self.set.all() {
            b.graph_release(reg);
        }
    }

    /// The queue dropped buffers and graphs report to.
    pub(crate) fn releases(&self) -> ReleaseQueue {
        self.releases.clone()
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn ctx(&self, what: &str) -> Result<&Arc<Context>> {
        self.ctx.as_ref().ok_or_else(|| Error::Unsupported {
            what: what.into(),
            reason: "this communicator's device side is the CPU stand-in (no GPU)".into(),
        })
    }

    /// `len` elements of `T` every peer maps, registered with the backends that read peers'
    /// inputs.
    ///
    /// # Collective
    /// Every rank, same `len` and `T`, in the same order.
    ///
    /// # Errors
    /// [`Error::Cuda`] when allocation or IPC fails (on every rank); [`Error::Mismatch`] when
    /// ranks ask for different sizes; [`Error::PeerTimeout`].
    pub(crate) fn alloc_shared<T: crate::Element>(&mut self, boot: &Bootstrap, len: usize) -> Result<DeviceBuffer<T>> {
        const STEP: &str = "alloc_shared";
        let ctx = self.ctx(STEP)?.clone();
        self.release_shared(boot)?;
        let bytes = len * size_of::<T>();
        let mem = IpcBuffer::alloc(&ctx, bytes).and_then(|m| m.zero().map(|()| m));
        let mem = Arc::new(exchange::agree(boot.world(), mem, boot.timeout, STEP)?);
        let id = self.next_id();
        for b in self.set.all() {
            b.register_buffer(id, mem.ptr(), bytes)?;
        }
        self.shared.insert(id, mem.clone());
        Ok(DeviceBuffer::new(&ctx, mem, len, Release::Shared(self.releases.clone(), id)))
    }

    /// `len` elements of `T` of exportable device memory, not registered. Local.
    ///
    /// # Errors
    /// [`Error::Cuda`] when allocation fails.
    pub(crate) fn alloc_device<T: crate::Element>(&mut self, len: usize) -> Result<DeviceBuffer<T>> {
        let ctx = self.ctx("alloc_device")?.clone();
        let mem = IpcBuffer::alloc(&ctx, len * size_of::<T>())?;
        mem.zero()?;
        let mem = Arc::new(mem);
        self.private.push(mem.clone());
        Ok(DeviceBuffer::new(&ctx, mem, len, Release::Private))
    }

    /// Free what dropped graphs held (local: their rows wait for the device to finish).
    fn release_graphs(&mut self) {
        let graphs = std::mem::take(&mut self.releases.lock().unwrap_or_else(|e| e.into_inner()).graphs);
        for reg in graphs {
            self.release_registration(reg);
        }
    }

    /// Free the shared buffers every rank has released: the device finishes its work, the
    /// backends forget them (peers close their mappings), every rank passes a barrier, then the
    /// memory goes.
    ///
    /// # Collective
    /// Every rank.
    fn release_shared(&mut self, boot: &Bootstrap) -> Result<()> {
        const STEP: &str = "releasing shared buffers";
        let new = std::mem::take(&mut self.releases.lock().unwrap_or_else(|e| e.into_inner()).buffers);
        self.releasing.extend(new);
        let mine: Vec<u8> = self.releasing.iter().flat_map(|id| id.to_le_bytes()).collect();
        let all = exchange::all_gather_bytes(boot.world(), &mine, boot.timeout, STEP)?;
        let lists: Vec<Vec<u64>> = all
            .iter()
            .map(|b| b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
            .collect();
        let common: Vec<u64> =
            self.releasing.iter().copied().filter(|id| lists.iter().all(|l| l.contains(id))).collect();
        if common.is_empty() {
            return Ok(());
        }
        if let Some(ctx) = &self.ctx {
            runtime::synchronize(ctx, "synchronize (releasing shared buffers)")?;
        }
        for &id in &common {
            for b in self.set.all() {
                b.release_buffer(id)?;
            }
        }
        exchange::barrier(boot.world(), boot.timeout, STEP)?;
        for id in &common {
            self.shared.remove(id);
        }
        self.releasing.retain(|id| !common.contains(id));
        Ok(())
    }

    /// Finish every pending call (bounded), then wait for every rank before anything is freed,
    /// so no rank frees memory a slower peer still reads.
    ///
    /// # Collective
    /// Every rank.
    ///
    /// # Errors
    /// The first error of the pending work; [`Error::PeerTimeout`] when a rank does not arrive.
    pub(crate) fn finalize(&mut self, boot: &Bootstrap, wait: std::time::Duration, failed: bool) -> Result<()> {
        if failed {
            self.abort();
        }
        let drained = self.set.all().try_for_each(|b| b.drain(wait));
        let synced = match &self.ctx {
            Some(ctx) => runtime::synchronize(ctx, "synchronize (finalize)"),
            None => Ok(()),
        };
        let met = exchange::barrier(boot.world(), wait, "finalize");
        drained.and(synced).and(met)
    }

    /// Stop what the backends have pending that no fault word stops (NCCL's kernels).
    pub(crate) fn abort(&mut self) {
        for b in self.set.all() {
            b.abort();
        }
    }
}

/// The context of this rank's GPU, of this build's vendor (one vendor per build): the
/// application's, made current, or the GPU of the ordinal asked for, or by default of
/// `local_rank % visible GPUs`.
///
/// # Errors
/// [`Error::Unsupported`] naming what is missing where no GPU of the vendor is usable (no
/// driver or runtime, no device, an AMD architecture without code objects); the vendor's error.
fn open_context(boot: &Bootstrap, spec: &DeviceSpec) -> Result<Arc<Context>> {
    match spec {
        DeviceSpec::Context(ctx) => {
            runtime::bind(ctx)?;
            Ok(ctx.clone())
        }
        DeviceSpec::Ordinal(o) => runtime::open(Some(*o), boot.layout.local_rank),
        _ => runtime::open(None, boot.layout.local_rank),
    }
}

/// Map the fault page into the device, or fall back to a private word (logged).
fn map_fault(ctx: &Arc<Context>, boot: &Bootstrap, fault: &GroupFault) -> Result<(FaultMapping, FaultTarget)> {
    let raise = crate::fault::raised_word(crate::fault::KIND_KERNEL, boot.layout.rank);
    let (page, bytes) = fault.page();
    // SAFETY: the page belongs to `fault`, which the communicator keeps until after the device
    // side (and with it this registration) is gone.
    match unsafe { MappedHostPage::register(ctx, page, bytes) } {
        Ok(m) => {
            let word = m.device_ptr();
            Ok((FaultMapping::Page(m), FaultTarget { word, raise }))
        }
        Err(e) => {
            log::warn!(
                "tpcomm: rank {}: the fault page cannot be mapped into the GPU ({e}); kernels will end waits on their \
                 own timeouts only",
                boot.layout.rank
            );
            let word = IpcBuffer::alloc(ctx, 8)?;
            word.zero()?;
            let ptr = word.ptr();
            Ok((FaultMapping::Private(word), FaultTarget { word: ptr, raise }))
        }
    }
}
