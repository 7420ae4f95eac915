//! Running a plan: its steps, in order, on the caller's stream.
//!
//! Every step is enqueued, none waited for: a reduce step goes to the backend of its algorithm
//! and group, copies, zero fills and the split path's norm go to the stream. Steps of one plan
//! run on one stream in order, so a later step sees what an earlier one wrote.

use super::backend_set::BackendSet;
use super::norm::NormKernel;
use crate::algo::{Algo, BackendKind};
use crate::backend::Call;
use crate::error::{Error, Result};
use crate::plan::{Op, Plan, Src};
use crate::runtime::Context;
use std::sync::Arc;

/// Enqueue every step of `plan` for `call`.
///
/// # Safety
/// `call`'s addresses are valid for `call.len` elements of `call.dtype` in the memory its
/// stream reaches, and not written by other work until the enqueued steps ran.
///
/// # Collective
/// Every rank, with plans made from the same request (the dispatch is pure, so they are).
pub(crate) unsafe fn execute(
    set: &mut BackendSet,
    norm: &mut NormKernel,
    ctx: Option<&Arc<Context>>,
    plan: &Plan,
    call: &Call,
) -> Result<()> {
    let size = call.dtype.size();
    for step in &plan.steps {
        let off = (step.range.start * size) as u64;
        let bytes = step.range.len() * size;
        match step.op {
            // SAFETY: the ranges lie inside the call's buffers (the plan cuts within 0..len).
            Op::Copy => unsafe { call.stream.copy(call.output + off, call.input + off, bytes) }?,
            // SAFETY: as above.
            Op::Zero => unsafe { call.stream.zero(call.output + off, bytes) }?,
            Op::Reduce { algo, group, src } => {
                let kind = backend_of(algo)?;
                let input = match src {
                    Src::Input => call.input,
                    Src::Output => call.output,
                } + off;
                // Only the caller's input can lie in a registered buffer.
                let registered_only = call.registered_only && src == Src::Input;
                let sub = Call {
                    input,
                    output: call.output + off,
                    len: step.range.len(),
                    registered_only,
                    norm: None,
                    ..*call
                };
                // SAFETY: the sub-call's ranges lie inside the call's buffers.
                unsafe { set.get(kind, group)?.enqueue(algo, &sub) }?;
            }
            Op::ReduceAddRmsNorm { algo, group } => {
                if call.norm.is_none() || step.range != (0..call.len) {
                    return Err(Error::Internal("a fused step without its norm, or on part of a call".into()));
                }
                // SAFETY: the whole call, with its norm buffers (the caller's contract).
                unsafe { set.get(backend_of(algo)?, group)?.enqueue(algo, call) }?;
            }
            Op::AddRmsNorm => {
                let args = call.norm.as_ref().ok_or_else(|| Error::Internal("a norm step without its norm".into()))?;
                // SAFETY: an earlier step left the sums in the output; the norm buffers are the
                // caller's.
                unsafe { norm.enqueue(ctx, call.output, args, call.len, call.dtype, call.stream) }?;
            }
        }
    }
    Ok(())
}

fn backend_of(algo: Algo) -> Result<BackendKind> {
    algo.info().backend.ok_or_else(|| Error::Internal(format!("plan step names {algo}, which has no backend")))
}
