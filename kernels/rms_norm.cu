// Residual add + RMSNorm after an allreduce that was not fused with it (the split path):
// `sum` holds the allreduce's result; one block per row at a time (kernels/rms_norm.cuh).
//
// Compiled after common.cuh and rms_norm.cuh, with the custom family's defines for one rank
// (only TPCOMM_THREADS matters here: every launch has that many threads).

// The allreduce's sum, read from memory.
struct LoadSum {
    const Vec16* p;
    __device__ __forceinline__ Vec16 operator()(u64 i) const { return p[i]; }
};

// Entry points, one per dtype: (sum, residual, residual_out, weight, norm_out, rows, hidden, eps).
#define TPCOMM_NORM_ENTRY(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(TPCOMM_THREADS)                                              \
        NAME(const char* sum, const char* residual, char* residual_out, const char* weight, char* norm_out,   \
             u64 rows, u64 hidden, float eps) {                                                               \
        const NormArgs a = {residual, residual_out, weight, hidden, eps, 0};                                  \
        const LoadSum src = {(const Vec16*)sum};                                                              \
        Vec16 w[TPCOMM_NORM_KEEP], res[TPCOMM_NORM_KEEP], keep[TPCOMM_NORM_KEEP];                             \
        load_weight<T>(a, w);                                                                                 \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                                            \
            load_residual<T>(a, row, res);                                                                    \
            const float inv = add_residual_row<T>(src, row, a, res, keep);                                    \
            norm_row<T, true>(row, a, inv, keep, w, norm_out);                                                      \
        }                                                                                                     \
    }

TPCOMM_NORM_ENTRY(add_rms_norm_f32, F32)
TPCOMM_NORM_ENTRY(add_rms_norm_f16, F16)
TPCOMM_NORM_ENTRY(add_rms_norm_bf16, BF16)
