//! A CPU stand-in for the device backends, for tests without a GPU.
//!
//! It serves every device algorithm over *host* memory: the call's addresses are host pointers,
//! the stream is [`crate::runtime::StreamRef::Host`], and "enqueue" gathers every rank's input
//! over the group's MPI communicator (bounded by the timeout) and sums it in rank order, the
//! same bits the real kernels produce. Everything above the seam (the plan's steps, chunking,
//! the hierarchy's node and cross-node legs, the failure state, lazy set-up) then runs for real
//! in CI, and its results can be checked bit for bit against the exact reference.
//!
//! It does not capture CUDA graphs (there are none on the CPU).

use super::{Call, DeviceBackend};
use crate::algo::{Algo, BackendKind};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::fault::FaultWord;
use crate::runtime::StreamRef;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::time::Duration;

/// One group's stand-in backend.
pub(crate) struct MockBackend {
    comm: crate::exchange::Comm,
    kind: BackendKind,
    timeout: Duration,
    /// Waits stop when the group fails, as the kernels' do.
    fault: FaultWord,
}

impl MockBackend {
    /// A stand-in for `kind` among the ranks of `comm` (duplicated, so its messages never mix
    /// with anyone else's).
    pub(crate) fn new(comm: &SimpleCommunicator, kind: BackendKind, timeout: Duration, fault: FaultWord) -> Self {
        MockBackend { comm: crate::exchange::Comm::new(comm.duplicate()), kind, timeout, fault }
    }
}

/// Bytes of the header every blob starts with: the dtype's code and the element count, so ranks
/// making different calls stop with a mismatch, as the kernels' call tags make them.
const HEADER: usize = 16;

/// `out = sum over ranks (in order) of the gathered inputs`, each `len` elements of `T`; for a
/// quick algorithm, the host model of its codec (the bits the quick kernels produce).
fn sum_into<T: Element>(algo: Algo, blobs: &[Vec<u8>], out: *mut T, len: usize) -> Result<()> {
    let inputs: Vec<Vec<T>> = blobs
        .iter()
        .map(|b| {
            let data = b[HEADER..].as_ptr() as *const T;
            // SAFETY: every blob holds `len` elements of T after its header (checked by the
            // caller); unaligned reads.
            (0..len).map(|i| unsafe { data.add(i).read_unaligned() }).collect()
        })
        .collect();
    let views: Vec<&[T]> = inputs.iter().map(|x| &x[..]).collect();
    let sum = match algo.codec() {
        None => crate::dtype::reference_sum(&views),
        Some(codec) => crate::quant::quick_reference_any(codec, &views)
            .ok_or_else(|| crate::runtime::kernels::unsupported_dtype("quick allreduce", T::DTYPE))?,
    };
    for (i, v) in sum.into_iter().enumerate() {
        // SAFETY: `out` holds `len` elements (the caller's contract).
        unsafe { out.add(i).write_unaligned(v) };
    }
    Ok(())
}

impl DeviceBackend for MockBackend {
    unsafe fn enqueue(&mut self, algo: Algo, call: &Call) -> Result<()> {
        if algo.info().backend != Some(self.kind) {
            return Err(Error::Internal(format!("the {:?} stand-in was asked to run {algo}", self.kind)));
        }
        if !matches!(call.stream, StreamRef::Host) || call.capture.is_some() {
            return Err(Error::Internal("the CPU stand-in serves host calls only, never captures".into()));
        }
        let bytes = call.bytes();
        let mut mine = Vec::with_capacity(HEADER + bytes);
        mine.extend_from_slice(&u64::from(call.dtype.code()).to_le_bytes());
        mine.extend_from_slice(&(call.len as u64).to_le_bytes());
        // SAFETY: `input` is host memory of `bytes` bytes (the caller's contract).
        mine.extend_from_slice(unsafe { std::slice::from_raw_parts(call.input as *const u8, bytes) });
        let all = crate::exchange::all_gather_bytes_unless(
            &*self.comm,
            &mine,
            self.timeout,
            "mock allreduce",
            Some(self.fault),
        )?;
        if let Some(r) = all.iter().position(|b| b.len() != mine.len() || b[..HEADER] != mine[..HEADER]) {
            return Err(Error::Mismatch {
                op: "mock allreduce",
                detail: format!("rank {r} of the group made another call (length or dtype) than this rank"),
            });
        }
        if call.norm.is_some() && algo != Algo::OneShot {
            return Err(Error::Internal(format!("the norm cannot be fused into {algo}")));
        }
        match call.dtype {
            DType::F32 => sum_into::<f32>(algo, &all, call.output as *mut f32, call.len),
            DType::F64 => sum_into::<f64>(algo, &all, call.output as *mut f64, call.len),
            DType::F16 => sum_into::<half::f16>(algo, &all, call.output as *mut half::f16, call.len),
            DType::BF16 => sum_into::<half::bf16>(algo, &all, call.output as *mut half::bf16, call.len),
        }?;
        match &call.norm {
            // The fused kernel's epilogue: the same host function as the split path's.
            // SAFETY: the norm's buffers are host memory of the call (the caller's contract).
            Some(norm) => unsafe { crate::norm::add_rms_norm_host(call.output, norm, call.len, call.dtype) },
            None => Ok(()),
        }
    }

    fn poll(&mut self) -> Result<()> {
        Ok(())
    }
}
