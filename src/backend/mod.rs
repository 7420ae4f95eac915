//! Backends: one file per family of algorithms (`custom`: CUDA IPC kernels, `nccl`: NCCL,
//! `host`: shared memory). A backend knows nothing of another; the
//! [`crate::Communicator`] owns them and the [`crate::dispatch`] table chooses.

pub mod custom;
pub mod host;
pub mod nccl;
pub mod packet;
