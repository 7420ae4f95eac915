// Residual add + RMSNorm of whole rows: the epilogue of tpcomm's fused allreduce and its
// standalone kernel (kernels/rms_norm.cu) share this code, so both paths give the same bits.
//
// Compiled after common.cuh. Needs TPCOMM_THREADS (threads per block of every launch that
// calls it: the sum of squares is defined over that many lanes) and TPCOMM_NORM_LATE_ROWS (rows
// a block of the fused kernel keeps the norms of until its end barrier).
//
// Numerics (src/norm.rs states them for users; its host reference computes the same bits):
//   s_i = the allreduce sum of element i (all_reduce's bits, rounded to T once)
//   r_i = T(f32(s_i) + f32(residual_i))                       -> residual_out
//   lane t of the row's sum of squares: every element i with (i / PER_VEC) % TPCOMM_THREADS == t,
//     in increasing i, acc = acc + r_i * r_i (fp32, each operation rounded, no FMA), from 0
//   ss = the lanes combined by halving trees (v[l] += v[l + n] for n = 16, 8, 4, 2, 1 within each
//     group of 32 lanes, then the same over the TPCOMM_THREADS / 32 group sums)
//   inv = 1 / sqrt(ss / hidden + eps), each operation rounded to fp32
//   y_i = T((r_i * inv) * weight_i)                           -> norm_out

#if !defined(TPCOMM_THREADS)
#error "compile through tpcomm's module cache: TPCOMM_THREADS is missing"
#endif
#if TPCOMM_THREADS % 32 != 0 || ((TPCOMM_THREADS / 32) & (TPCOMM_THREADS / 32 - 1)) != 0 || TPCOMM_THREADS > 1024
#error "the sum of squares is written for a power-of-two count of at most 32 groups of 32 lanes"
#endif

// Vectors of a row every thread keeps in registers between the two passes (hidden up to
// 2 * TPCOMM_THREADS * PER_VEC: 8192 bf16); longer rows re-read what this thread stored.
#define TPCOMM_NORM_KEEP 2

// What the epilogue needs besides the sums.
struct NormArgs {
    const char* residual;
    char* residual_out;  // may be `residual` itself (each element is read before it is written)
    const char* weight;  // hidden elements
    u64 hidden;          // elements per row, a multiple of PER_VEC
    float eps;
    int late;            // fused in place: norm_out (our input) is written after the end barrier
};

#if !defined(TPCOMM_NORM_LATE_ROWS)
#error "compile through tpcomm's module cache: TPCOMM_NORM_LATE_ROWS is missing"
#endif

template <typename T>
__device__ __forceinline__ Vec16 add_vec(const Vec16& s, const Vec16& res) {
    float a[T::PER_VEC], b[T::PER_VEC];
    unpack<T>(s, a);
    unpack<T>(res, b);
#pragma unroll
    for (int e = 0; e < T::PER_VEC; e++) a[e] = add_rn(a[e], b[e]);
    return pack<T>(a);
}

template <typename T>
__device__ __forceinline__ float add_squares(const Vec16& r, float acc) {
    float a[T::PER_VEC];
    unpack<T>(r, a);
#pragma unroll
    for (int e = 0; e < T::PER_VEC; e++) acc = add_rn(acc, mul_rn(a[e], a[e]));
    return acc;
}

template <typename T>
__device__ __forceinline__ Vec16 scale_vec(const Vec16& r, float inv, const Vec16& w) {
    float a[T::PER_VEC], b[T::PER_VEC];
    unpack<T>(r, a);
    unpack<T>(w, b);
#pragma unroll
    for (int e = 0; e < T::PER_VEC; e++) a[e] = mul_rn(mul_rn(a[e], inv), b[e]);
    return pack<T>(a);
}

// 1 / sqrt(mean square + eps) of a row from this thread's lane `partial`; every thread of the
// block calls it (it synchronises the block) and gets the same value.
__device__ __forceinline__ float row_inv_rms(float partial, u64 hidden, float eps) {
    __shared__ float groups[TPCOMM_THREADS / 32];
    // Halving tree within the 32-lane group: after the step with offset o, lanes l and l ^ o hold
    // the same sum (fp32 addition commutes exactly), so lane 0 ends with the tree's value.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) partial = add_rn(partial, __uint_as_float(lane_xor(__float_as_uint(partial), o, 0xffffffffu)));
    __syncthreads();  // the previous row's readers of `groups` are done
    if ((threadIdx.x & 31) == 0) groups[threadIdx.x >> 5] = partial;
    __syncthreads();
    // The same halving tree over the group sums, in every warp at once (lanes l and l + 16 hold
    // the same group and never exchange): registers only, no third synchronisation.
    float g = groups[threadIdx.x & (TPCOMM_THREADS / 32 - 1)];
#pragma unroll
    for (int o = TPCOMM_THREADS / 64; o > 0; o >>= 1) g = add_rn(g, __uint_as_float(lane_xor(__float_as_uint(g), o, 0xffffffffu)));
    const float mean = div_rn(g, (float)hidden);
    return div_rn(1.0f, sqrt_rn(add_rn(mean, eps)));
}

// Vectors of the weight (the same for every row) this thread keeps: loaded once per launch,
// before any wait, so the epilogue never waits for them.
template <typename T>
__device__ __forceinline__ void load_weight(const NormArgs& a, Vec16* w) {
    const u64 per_row = a.hidden / T::PER_VEC;
#pragma unroll
    for (int j = 0; j < TPCOMM_NORM_KEEP; j++) {
        const u64 k = threadIdx.x + (u64)j * TPCOMM_THREADS;
        if (k < per_row) w[j] = ((const Vec16*)a.weight)[k];
    }
}

// This thread's first residual vectors of `row`, loaded ahead (before a barrier's wait).
template <typename T>
__device__ __forceinline__ void load_residual(const NormArgs& a, u64 row, Vec16* res) {
    const u64 per_row = a.hidden / T::PER_VEC;
#pragma unroll
    for (int j = 0; j < TPCOMM_NORM_KEEP; j++) {
        const u64 k = threadIdx.x + (u64)j * TPCOMM_THREADS;
        if (k < per_row) res[j] = ((const Vec16*)a.residual)[row * per_row + k];
    }
}

// First half of a row: residual_out = sum + residual, and the row's 1 / rms. `sum_of(i)` yields
// vector i of the allreduce sum (a load, or the rank-order sum of every rank's input); `res`
// holds this thread's first residual vectors (load_residual), `keep` receives its first
// residual_out vectors. Every thread of the block calls it for the same row (it synchronises
// the block); blockDim.x == TPCOMM_THREADS.
template <typename T, typename Sum>
__device__ __forceinline__ float add_residual_row(const Sum& sum_of, u64 row, const NormArgs& a, const Vec16* res,
                                                  Vec16* keep) {
    const u64 per_row = a.hidden / T::PER_VEC;
    const u64 base = row * per_row;
    Vec16* res_out = (Vec16*)a.residual_out;
    float partial = 0.0f;
#pragma unroll
    for (int j = 0; j < TPCOMM_NORM_KEEP; j++) {
        const u64 k = threadIdx.x + (u64)j * TPCOMM_THREADS;
        if (k < per_row) {
            keep[j] = add_vec<T>(sum_of(base + k), res[j]);
            res_out[base + k] = keep[j];
            partial = add_squares<T>(keep[j], partial);
        }
    }
    for (u64 k = threadIdx.x + (u64)TPCOMM_NORM_KEEP * TPCOMM_THREADS; k < per_row; k += TPCOMM_THREADS) {
        const Vec16 r = add_vec<T>(sum_of(base + k), ((const Vec16*)a.residual)[base + k]);
        res_out[base + k] = r;
        partial = add_squares<T>(r, partial);
    }
    return row_inv_rms(partial, a.hidden, a.eps);
}

// Second half: norm_out of the row from residual_out (this thread's first vectors in `keep`, or
// read back from residual_out when not KEPT: only this thread's own stores are read). KEPT is a
// template parameter so `keep`, `w` and `res` stay in registers (a run-time choice of pointer
// would put them in local memory, and the loads before the start barrier would then complete
// before it instead of overlapping it).
template <typename T, bool KEPT>
__device__ __forceinline__ void norm_row(u64 row, const NormArgs& a, float inv, const Vec16* keep, const Vec16* w,
                                         char* norm_out) {
    const u64 per_row = a.hidden / T::PER_VEC;
    const u64 base = row * per_row;
    const Vec16* res_out = (const Vec16*)a.residual_out;
    Vec16* y = (Vec16*)norm_out;
#pragma unroll
    for (int j = 0; j < TPCOMM_NORM_KEEP; j++) {
        const u64 k = threadIdx.x + (u64)j * TPCOMM_THREADS;
        if (k < per_row) y[base + k] = scale_vec<T>(KEPT ? keep[j] : res_out[base + k], inv, w[j]);
    }
    for (u64 k = threadIdx.x + (u64)TPCOMM_NORM_KEEP * TPCOMM_THREADS; k < per_row; k += TPCOMM_THREADS)
        y[base + k] = scale_vec<T>(res_out[base + k], inv, ((const Vec16*)a.weight)[k]);
}
