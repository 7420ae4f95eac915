//! Backends: one file per family of algorithms, behind one seam.
//!
//! - `custom`: IPC one-shot and two-shot (`kernels/custom_allreduce.cu`);
//! - `packet`: barrier-free LL and Lamport kernels (`kernels/packet_allreduce.cu`);
//! - `quick`: two-shot with quantized traffic (`kernels/quick_allreduce.cu`), opt-in;
//! - `nccl`: NCCL through cudarc's raw bindings (the default build); `rccl`: RCCL through
//!   `runtime::hip::rccl` (a ROCm build); one of them is the build's [`Collective`];
//! - `host`: shared memory of one node (host buffers; not a device backend);
//! - `mock`: a CPU stand-in for the device backends, so the device layer's routing, plans,
//!   failure handling and registration bookkeeping run in CI without a GPU.
//!
//! The IPC backends (custom, packet, quick) are one code for both vendors: they reach the GPU
//! only through the runtime facade (`crate::runtime`), which is CUDA's or HIP's by build.
//!
//! A backend knows nothing of another; [`crate::plan`] chooses and the device layer
//! (`crate::device`) runs what it chose. Every device backend implements [`DeviceBackend`]:
//! enqueue a call without waiting for the GPU, report errors recorded by device work since
//! (`poll`), and take part in graph registration. `peer_group` holds the IPC set-up the IPC
//! backends share.
//!
//! Adding a backend is: one file here implementing [`DeviceBackend`], its kernel file under
//! `kernels/` (a [`crate::runtime::kernels::Family`]), one row per algorithm in
//! [`crate::algo::ALGOS`], its build step in `device/backend_set.rs`, and a `Config` row if it
//! has a setting.

pub(crate) mod custom;
pub(crate) mod host;
pub(crate) mod mock;
#[cfg(not(feature = "rocm"))]
pub(crate) mod nccl;
pub(crate) mod packet;
pub(crate) mod peer_group;
pub(crate) mod quick;
pub(crate) mod rank_data;
#[cfg(feature = "rocm")]
pub(crate) mod rccl;

/// The backend of the NCCL slot ([`crate::algo::BackendKind::Nccl`]) in this build, with the
/// library it loads and whether that loads here: NCCL on CUDA, RCCL on ROCm (one vendor per
/// build). Both offer `new(comm, ctx, timeout)`, `world_size()` and `version()`.
#[cfg(not(feature = "rocm"))]
pub(crate) use nccl::{library_present as collective_library_present, NcclAllreduce as Collective, LIBRARY};
/// The backend of the NCCL slot in a ROCm build (see the CUDA build's).
#[cfg(feature = "rocm")]
pub(crate) use rccl::{library_present as collective_library_present, RcclAllreduce as Collective, LIBRARY};

use crate::algo::Algo;
use crate::dtype::DType;
use crate::error::Result;
use crate::norm::NormArgs;
use crate::runtime::StreamRef;

/// A registration of captured calls (`crate::GraphRegistration`), as backends know it.
pub(crate) type RegId = u64;

/// One call handed to a backend: device addresses (host addresses for the CPU stand-in), the
/// element count and type, the caller's stream, and whether the stream is capturing for a
/// registration.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    pub input: u64,
    pub output: u64,
    pub len: usize,
    pub dtype: DType,
    pub stream: StreamRef<'a>,
    /// `Some(registration)` while `stream` captures a CUDA graph under that registration (the
    /// device layer refuses captures outside one, so a backend never sees them).
    pub capture: Option<RegId>,
    /// The input must lie in a buffer registered with [`DeviceBackend::register_buffer`] (never
    /// copied into a staging buffer first: the seed's `all_reduce` without a staging buffer).
    pub registered_only: bool,
    /// Residual add + RMSNorm fused into the reduction (`output` is then `norm_out`): only for
    /// the algorithms the plan fuses ([`crate::plan::Op::ReduceAddRmsNorm`]); `None` otherwise.
    pub norm: Option<NormArgs>,
}

impl Call<'_> {
    /// Bytes per rank.
    pub(crate) fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// The seam between the device layer and a device backend.
pub(crate) trait DeviceBackend {
    /// Enqueue `call` with `algo` on the call's stream; never waits for the GPU. A failure of the
    /// device work (a peer that never came, a mismatched call) is recorded where
    /// [`DeviceBackend::poll`] finds it.
    ///
    /// # Safety
    /// `call.input` and `call.output` are valid for `call.len` elements of `call.dtype` in the
    /// memory the stream reaches (device memory of this context, or host memory for the CPU
    /// stand-in), and not written by other work until the call (or a replay of its capture) ran.
    ///
    /// # Collective
    /// Every rank of the backend's group, same length, dtype and algorithm, in the same order.
    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()>;

    /// Whether every peer reaches `call`'s input and output where they are (no staging copy, no
    /// scratch): what lets the plan send a large call to a kernel that stores into the peers'
    /// outputs. Backends without such kernels say no.
    fn reads_in_place(&mut self, _call: &Call) -> bool {
        false
    }

    /// Report an error recorded by device work enqueued so far (the mapped error word, NCCL's
    /// asynchronous error); cheap and non-blocking. `Ok` says nothing about work not yet run.
    fn poll(&mut self) -> Result<()>;

    /// Make the buffer `[ptr, ptr + bytes)` (allocated by tpcomm, IPC-exportable) known to every
    /// peer, so calls whose input lies in it are read in place. Backends that read only their
    /// own memory do nothing.
    ///
    /// # Collective
    /// Every rank of the backend's group, each with its own buffer of the same size.
    fn register_buffer(&mut self, _id: u64, _ptr: u64, _bytes: usize) -> Result<()> {
        Ok(())
    }

    /// Forget a buffer every rank released (peers' mappings of it are closed).
    ///
    /// # Collective
    /// Every rank of the backend's group, for the same buffers.
    fn release_buffer(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }

    /// A registration begins: calls captured until [`DeviceBackend::graph_end`] belong to `reg`.
    fn graph_begin(&mut self, _reg: RegId) -> Result<()> {
        Ok(())
    }

    /// Capture is over: exchange with the peers what the captured calls of `reg` read, so the
    /// graph's replays find every rank's buffers.
    ///
    /// # Collective
    /// Every rank of the backend's group, after capturing the same calls.
    fn graph_end(&mut self, _reg: RegId) -> Result<()> {
        Ok(())
    }

    /// Free what registration `reg` holds (its graph is gone on this rank). Local.
    fn graph_release(&mut self, _reg: RegId) {}

    /// Stop pending device work that does not watch the group's fault word (NCCL's kernels);
    /// the backend refuses every later call.
    fn abort(&mut self) {}

    /// Wait, at most `timeout`, until every call enqueued on this backend has finished, and
    /// report its errors (for `finalize`); backends whose calls are bounded by their kernels'
    /// own waits only poll.
    fn drain(&mut self, _timeout: std::time::Duration) -> Result<()> {
        self.poll()
    }
}
