//! The split path's residual add + RMSNorm (`kernels/rms_norm.cu`): a kernel local to each
//! rank, run after the allreduce on the caller's stream. Its epilogue is the fused kernel's own
//! code, so both paths give the same bits ([`crate::norm`]).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::norm::NormArgs;
use crate::runtime::kernels::{self, Functions};
use crate::runtime::{protocol, Context, StreamRef};
use std::path::PathBuf;
use std::sync::Arc;

/// Most blocks of one launch: rows beyond are taken in turns (a block per row is enough to fill
/// the GPU at the token counts where the launch cost matters).
const MAX_BLOCKS: usize = 1024;

/// The one entry point of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AddRmsNorm;

/// The add + norm kernel, compiled (or loaded from the kernel cache) at its first use.
pub(crate) struct NormKernel {
    cache_dir: PathBuf,
    funcs: Option<Functions<AddRmsNorm>>,
}

impl NormKernel {
    pub(crate) fn new(cache_dir: PathBuf) -> Self {
        NormKernel { cache_dir, funcs: None }
    }

    fn funcs(&mut self, ctx: &Arc<Context>) -> Result<&Functions<AddRmsNorm>> {
        if self.funcs.is_none() {
            let (funcs, _) = kernels::NORM.load(
                ctx,
                1,
                Some(self.cache_dir.clone()),
                &[AddRmsNorm],
                |_| "add_rms_norm",
                "RMSNorm",
            )?;
            self.funcs = Some(funcs);
        }
        self.funcs.as_ref().ok_or_else(|| Error::Internal("the norm kernel was not loaded".into()))
    }

    /// Enqueue `residual_out = sum + residual; norm_out = RMSNorm(residual_out) * weight` on
    /// `stream`, where `norm_out` holds the allreduce's sums (the split path sums into it; each
    /// thread reads its sums before it writes the same elements). `ctx`: the communicator's
    /// context; `None` for host memory, which is done at once on the calling thread.
    ///
    /// # Safety
    /// `norm_out` and `args`' buffers are valid for `len` elements of `dtype` (weight:
    /// `args.hidden`) in the memory `stream` reaches, laid out as `crate::norm` requires, until
    /// the work ran.
    pub(crate) unsafe fn enqueue(
        &mut self,
        ctx: Option<&Arc<Context>>,
        norm_out: u64,
        args: &NormArgs,
        len: usize,
        dtype: DType,
        stream: StreamRef,
    ) -> Result<()> {
        let s = match stream {
            // SAFETY: the caller's contract.
            StreamRef::Host => return unsafe { crate::norm::add_rms_norm_host(norm_out, args, len, dtype) },
            StreamRef::Device(s) => s,
        };
        let ctx = ctx.ok_or_else(|| Error::Internal("a device stream without the communicator's context".into()))?;
        let func =
            self.funcs(ctx)?.get(&(AddRmsNorm, dtype)).ok_or_else(|| kernels::unsupported_dtype("RMSNorm", dtype))?;
        let rows = (len / args.hidden.max(1)) as u64;
        if rows == 0 {
            return Ok(());
        }
        let hidden = args.hidden as u64;
        let blocks = (rows as usize).min(MAX_BLOCKS);
        use crate::runtime::arg;
        let mut params = [
            arg(&norm_out),
            arg(&args.residual),
            arg(&args.residual_out),
            arg(&args.weight),
            arg(&norm_out),
            arg(&rows),
            arg(&hidden),
            arg(&args.eps),
        ];
        // SAFETY: the arguments match `(const char* sum, const char* residual, char* residual_out,
        // const char* weight, char* norm_out, u64 rows, u64 hidden, float eps)` in
        // kernels/rms_norm.cu, `sum` being norm_out; every buffer is valid (the caller's
        // contract). No programmatic
        // dependent launch: a waiting norm kernel must never hold room a peer's allreduce needs.
        unsafe {
            crate::runtime::launch(func, blocks, protocol::THREADS, s, &mut params, false, "kernel launch (norm)")
        }
    }
}
