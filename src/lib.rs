//! # tpcomm: fast allreduce among the ranks of an MPI job
//!
//! Tensor-parallel inference engines and HPC codes launch with `mpirun`, build one
//! [`Communicator`] over an MPI communicator, and call `all_reduce`. tpcomm picks the fastest
//! correct algorithm for each call ([`Algo`]) and the backend that runs it.
//!
//! ```no_run
//! # fn main() -> tpcomm::Result<()> {
//! let universe = mpi::initialize().expect("MPI initialised twice");
//! let comm = tpcomm::Communicator::new(&universe.world(), tpcomm::Config::from_env()?)?;
//! let input = vec![1.0f32; 1024];
//! let mut output = vec![0.0f32; 1024];
//! comm.all_reduce_host(&input, &mut output)?; // collective: every rank calls it
//! assert_eq!(output[0], comm.size() as f32);
//! # Ok(()) }
//! ```
//!
//! The engine flow on the GPU (its own context, its own capture, a registration, `poll`), in the
//! default build, whose [`Context`], [`Stream`] and [`Graph`] are cudarc's:
//!
//! ```no_run
//! # fn main() -> tpcomm::Result<()> {
//! use tpcomm::cudarc::driver::{sys, CudaContext};
//! let universe = mpi::initialize().expect("MPI initialised twice");
//! let ctx = CudaContext::new(0)?;                                  // the engine's context
//! let comm = tpcomm::Communicator::builder(&universe.world()).context(ctx.clone()).build()?;
//! let stream = ctx.new_stream()?;
//! let x = comm.alloc_shared::<tpcomm::bf16>(4096)?;                // collective, zero-copy
//! let mut y = stream.alloc_zeros::<tpcomm::bf16>(4096)?;
//! comm.all_reduce(&x, &mut y, &stream)?;                           // enqueued, never waits
//! comm.poll()?;                                                    // cheap error check
//! let reg = comm.begin_graph_registration()?;
//! stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
//! comm.all_reduce(&x, &mut y, &stream)?;                           // captured by the engine
//! let graph = reg.finish(stream.end_capture(sys::CUgraphInstantiate_flags(0))?)?; // collective
//! graph.launch()?;
//! comm.synchronize(&stream)?;                                      // results and errors
//! comm.finalize()?;                                                // collective teardown
//! # Ok(()) }
//! ```
//!
//! ## Words used throughout
//! - **Collective**: every rank of the communicator must make the call, in the same order, with
//!   the same lengths and dtypes. Every wait on a peer is bounded by `TPCOMM_TIMEOUT_MS`: a rank
//!   that does not arrive turns into [`Error::PeerTimeout`] on the others, never a hang.
//! - `_host`: the buffers are host memory. `_in_place`: the result overwrites the input.
//!   `_with`: per-call [`CallOptions`].
//! - **Enqueue**: device calls put work on the caller's stream and return; their errors surface
//!   at the next call, [`Communicator::poll`] or [`Communicator::synchronize`].
//! - **Rank order**: element `i` of the result is the sum over ranks `0..n-1`, in that order, in a
//!   wider accumulator, rounded once ([`verify::reference_sum`]). Every rank gets the same bits.
//!   Host memory, the custom device kernels and the packet kernels always sum in rank order;
//!   NCCL ([`Algo::Nccl`]) does not, so [`Config::deterministic`] keeps every call off it.
//!   Across nodes each node's partial sum (rank order) is rounded to the element type and the
//!   partials are summed in node order ([`verify::expected_hierarchical_sum`]).
//!
//! ## Layout of the crate
//! `communicator.rs` is the face; `plan.rs` the pure dispatch over the algorithm table
//! (`algo.rs`); `device/` runs plans on the device backends (`backend/`) through the vendor
//! runtime facade (`runtime/`: CUDA in the default build, HIP in a build with the Cargo feature
//! `rocm`, one vendor per build); `exchange.rs` is the bounded MPI byte exchange everything is
//! built on.

#![deny(missing_docs)]

mod algo;
mod backend;
mod bootstrap;
mod communicator;
mod config;
mod device;
mod dtype;
mod error;
mod exchange;
mod fault;
mod hierarchy;
pub mod norm;
mod plan;
pub mod quant;
mod runtime;
mod shm;
#[doc(hidden)]
pub mod testing;
mod topology;
mod tune;
mod tune_file;
pub mod verify;

pub use algo::{Algo, Memory};
pub use bootstrap::Layout;
pub use communicator::{AbortHandle, CallOptions, Communicator, CommunicatorBuilder};
pub use config::Config;
/// The CUDA driver bindings tpcomm's signatures use in the default build, re-exported so
/// applications need not match cudarc's version and features by hand.
pub use cudarc;
pub use device::buffer::DeviceBuffer;
pub use device::graph::{GraphRegistration, RegisteredGraph};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
/// The raw HIP runtime bindings a ROCm build's signatures use (for example
/// `hipStreamCaptureMode` of `HipStream::begin_capture`), re-exported as `cudarc` is in the
/// default build.
#[cfg(feature = "rocm")]
pub use hip_runtime_sys;
pub use norm::Fusion;
pub use plan::DispatchTable;
#[cfg(feature = "rocm")]
pub use runtime::hip::rocm_device_count;
/// The HIP types of a ROCm build beyond the aliases above: owned device memory
/// ([`HipSlice`], from `Stream::alloc_zeros`), the views of device memory, the guard of the
/// device-pointer traits, and the opened GPU and its stream and graph under their own names.
#[cfg(feature = "rocm")]
pub use runtime::hip::{
    buffer::{DeviceView, DeviceViewMut, HipSlice, SyncOnDrop},
    device::HipDevice,
    stream::{HipGraph, HipStream},
};
/// The GPU runtime's types of this build, under vendor-neutral names (one vendor per build): in
/// the default build exactly cudarc's (`Context` is `CudaContext`, `Stream` is `CudaStream`,
/// `Graph` is `CudaGraph`, and the device-pointer traits are cudarc's own), in a build with the
/// Cargo feature `rocm` tpcomm's HIP types of the same shape (`HipDevice`, `HipStream`,
/// `HipGraph`, and traits with cudarc's methods).
pub use runtime::{Context, DevicePtr, DevicePtrMut, DeviceSlice, Graph, Stream};
pub use topology::cuda_device_count;
