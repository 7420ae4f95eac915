//! # tpcomm: fast allreduce among the ranks of an MPI job
//!
//! Tensor-parallel inference engines and HPC codes launch with `mpirun`, build one
//! [`Communicator`] over an MPI communicator, and call `all_reduce`. tpcomm picks the fastest
//! correct algorithm for each call from its dispatch table ([`dispatch`]) and the backend that
//! implements it ([`backend`]).
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
//! ## Words used throughout
//! - **Collective**: every rank of the communicator must make the call, in the same order, with
//!   the same lengths and dtypes. A rank that does not arrive within `TPCOMM_TIMEOUT_MS` turns
//!   into [`Error::PeerTimeout`] on the others, never a hang.
//! - `_host`: the buffers are host memory. `_in_place`: the result overwrites the input.
//! - **Rank order**: element `i` of the result is the sum over ranks `0..n-1`, in that order, in a
//!   wider accumulator, rounded once ([`dtype::reference_sum`]). Every rank gets the same bits.
//!   Host memory, the custom device kernels and the packet kernels always sum in rank order;
//!   NCCL ([`Algo::Nccl`]) does not, so [`Config::deterministic`] keeps every call off it.

#![deny(missing_docs)]

pub mod backend;
pub mod bootstrap;
pub mod communicator;
pub mod config;
pub mod cuda;
pub mod dispatch;
pub mod dtype;
pub mod error;
pub mod hierarchy;
pub mod shm;
pub mod topology;
pub mod verify;

pub use communicator::Communicator;
pub use config::Config;
pub use dispatch::{Algo, DispatchTable};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
