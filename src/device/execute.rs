//! Running a plan: its steps, in order, on the caller's stream.
//!
//! Every step is enqueued, none waited for: a reduce step goes to the backend of its algorithm
//! and group, copies and zero fills go to the stream. Steps of one plan run on one stream in
//! order, so a later step sees what an earlier one wrote.

use super::backend_set::BackendSet;
use crate::backend::Call;
use crate::error::{Error, Result};
use crate::plan::{Op, Plan, Src};

/// Enqueue every step of `plan` for `call`.
///
/// # Safety
/// `call`'s addresses are valid for `call.len` elements of `call.dtype` in the memory its
/// stream reaches, and not written by other work until the enqueued steps ran.
///
/// # Collective
/// Every rank, with plans made from the same request (the dispatch is pure, so they are).
pub(crate) unsafe fn execute(set: &mut BackendSet, plan: &Plan, call: &Call) -> Result<()> {
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
                let kind = algo
                    .info()
                    .backend
                    .ok_or_else(|| Error::Internal(format!("plan step names {algo}, which has no backend")))?;
                let input = match src {
                    Src::Input => call.input,
                    Src::Output => call.output,
                } + off;
                // Only the caller's input can lie in a registered buffer.
                let registered_only = call.registered_only && src == Src::Input;
                let sub = Call { input, output: call.output + off, len: step.range.len(), registered_only, ..*call };
                // SAFETY: the sub-call's ranges lie inside the call's buffers.
                unsafe { set.get(kind, group)?.enqueue(algo, &sub) }?;
            }
        }
    }
    Ok(())
}
