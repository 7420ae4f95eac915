//! The one error type of the crate.
//!
//! Every fallible call returns [`Result<T>`]. Each variant names what went wrong and, where the
//! caller can act on it, what to do. Errors are never fatal to the process: MPI and CUDA failures
//! are turned into values. After an error that leaves peers out of step (a timeout, a mismatched
//! call, a collective call one rank rejected) the whole group is *failed*: every later call on
//! every rank of the node returns [`Error::Poisoned`] naming the first cause, instead of hanging
//! or handing back data. Build a new communicator (collectively) to go on.

use std::fmt;
use std::time::Duration;

/// Result with [`Error`] as the error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in tpcomm.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An argument of this call is wrong on this rank (lengths, alignment, pointers).
    InvalidArgument {
        /// The operation that was called.
        op: &'static str,
        /// What is wrong and what to do.
        detail: String,
    },
    /// A `TPCOMM_*` environment variable or a [`crate::Config`] field holds a value tpcomm does not accept.
    Config {
        /// The variable (or field) name.
        key: &'static str,
        /// The value that was given.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// Ranks made different calls (different lengths, dtypes or algorithms) in the same position.
    /// Every rank that took part sees this error; the communicator is poisoned afterwards.
    Mismatch {
        /// The operation.
        op: &'static str,
        /// Which rank differs, and how.
        detail: String,
    },
    /// A peer did not arrive at a synchronisation point within `TPCOMM_TIMEOUT_MS`.
    /// Usually a rank skipped a collective call, crashed, or is stuck elsewhere.
    PeerTimeout {
        /// The operation and the step that waited.
        op: &'static str,
        /// Rank (in the communicator) of the first peer that was missing, where known.
        peer: Option<usize>,
        /// How long this rank waited.
        waited: Duration,
    },
    /// An earlier error left the ranks out of step; this communicator cannot be used any more.
    /// Create a new one (collectively) after fixing the cause.
    Poisoned {
        /// The first error, as text.
        cause: String,
    },
    /// The call is not allowed in this state or with these settings: a forced algorithm that
    /// cannot serve the call, a device call before [`crate::Communicator::init_device`], a call
    /// captured into a CUDA graph outside a [`crate::GraphRegistration`]. The same verdict on
    /// every rank; nothing was sent.
    InvalidUsage {
        /// What was asked for.
        what: String,
        /// Why it cannot be done, and what to do instead.
        detail: String,
    },
    /// A collective step failed on another rank (its own error says why); this rank stopped
    /// too, so no rank waits for the others.
    PeerFailed {
        /// The step that failed.
        step: String,
    },
    /// The request is valid but cannot be served here (topology, world size, missing library).
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why it cannot run, and what would make it run.
        reason: String,
    },
    /// An operating-system call failed (shared memory, files).
    System {
        /// The call and its object, e.g. `shm_open /tpcomm.123`.
        op: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A CUDA driver call failed.
    Cuda {
        /// The operation.
        op: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// A HIP runtime call failed (Cargo feature `rocm`). Where the answer means that no AMD GPU
    /// can be used here, tpcomm returns [`Error::Unsupported`] instead.
    Hip {
        /// The call, e.g. `hipMalloc`.
        op: &'static str,
        /// HIP's status, e.g. `hipErrorOutOfMemory (2)`.
        code: String,
    },
    /// An NCCL call failed (or NCCL reported an asynchronous error). RCCL, NCCL's ROCm
    /// counterpart, reports through this variant too.
    Nccl {
        /// The operation.
        op: &'static str,
        /// NCCL's result code, e.g. `ncclInvalidUsage`.
        code: String,
        /// NCCL's description of the code and its last error message.
        detail: String,
    },
    /// Run-time compilation of a kernel failed; the log and the options are kept.
    Compile {
        /// Kernel family.
        kernel: String,
        /// Compiler log and options.
        log: String,
    },
    /// An MPI operation failed or MPI is not usable as needed.
    Mpi(String),
    /// A bug in tpcomm: please report it with the message.
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument { op, detail: detail.into() }
    }

    /// Shorthand for [`Error::System`] from the last OS error.
    pub(crate) fn last_os(op: impl Into<String>) -> Self {
        Error::System { op: op.into(), source: std::io::Error::last_os_error() }
    }

    /// Shorthand for [`Error::InvalidUsage`].
    pub(crate) fn usage(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::InvalidUsage { what: what.into(), detail: detail.into() }
    }

    /// True for errors after which the ranks may be out of step (the group is failed).
    pub fn desynchronizes(&self) -> bool {
        matches!(
            self,
            Error::PeerTimeout { .. } | Error::Mismatch { .. } | Error::Poisoned { .. } | Error::PeerFailed { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { op, detail } => write!(f, "{op}: invalid argument: {detail}"),
            Error::Config { key, value, expected } => {
                write!(f, "invalid {key}={value:?}: expected {expected}")
            }
            Error::Mismatch { op, detail } => write!(
                f,
                "{op}: ranks made mismatched calls: {detail} (every rank must make the same \
                 collective calls in the same order with the same lengths and dtypes)"
            ),
            Error::PeerTimeout { op, peer, waited } => write!(
                f,
                "{op}: timed out after {} ms waiting for {} (did it skip a collective call or \
                 die? raise TPCOMM_TIMEOUT_MS if it is only slow)",
                waited.as_millis(),
                peer.map_or("a peer".to_string(), |p| format!("rank {p}"))
            ),
            Error::Poisoned { cause } => {
                write!(f, "communicator is unusable after an earlier error ({cause}); create a new one")
            }
            Error::InvalidUsage { what, detail } => write!(f, "{what}: invalid usage: {detail}"),
            Error::PeerFailed { step } => {
                write!(f, "{step} failed on another rank (that rank's error says why; this rank stopped too)")
            }
            Error::Unsupported { what, reason } => write!(f, "{what} is not supported: {reason}"),
            Error::System { op, source } => write!(f, "{op}: {source}"),
            Error::Cuda { op, source } => write!(f, "{op}: CUDA error {source:?}"),
            Error::Hip { op, code } => write!(f, "{op}: HIP error {code}"),
            Error::Nccl { op, code, detail } => {
                write!(f, "{op}: NCCL error {code}: {detail} (NCCL_DEBUG=WARN prints NCCL's own account of it)")
            }
            Error::Compile { kernel, log } => write!(f, "compiling kernel {kernel} failed:\n{log}"),
            Error::Mpi(msg) => write!(f, "MPI: {msg}"),
            Error::Internal(msg) => write!(f, "internal error in tpcomm (please report): {msg}"),
        }
    }
}

/// Lets applications use `?` on cudarc calls (streams, copies) inside functions returning
/// [`Result`]; tpcomm's own calls name the operation instead.
impl From<cudarc::driver::DriverError> for Error {
    fn from(source: cudarc::driver::DriverError) -> Self {
        Error::Cuda { op: "CUDA driver call", source }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::System { source, .. } => Some(source),
            Error::Cuda { source, .. } => Some(source),
            _ => None,
        }
    }
}
