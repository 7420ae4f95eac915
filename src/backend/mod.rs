//! Backends: one file per family of algorithms. A backend knows nothing of another; the
//! [`crate::Communicator`] owns them and the [`crate::dispatch`] table chooses.

pub mod custom;
pub mod host;
pub mod packet;
