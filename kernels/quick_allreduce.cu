// Quick allreduce: a two-shot whose traffic is quantized, FP8 (e4m3) / INT8 / INT6 / INT4 codes
// with one fp32 scale per group of 32 values, for f32 / f16 / bf16 data.
//
// Compiled after kernels/common.cuh and kernels/barrier.cuh (src/runtime/kernels.rs) with the
// custom family's defines plus:
//   TPCOMM_QUICK_GROUP      values per scale (32)
//   TPCOMM_BARRIER_GATHER   id of the barrier after the owners pushed their reduced shards
//
// The arithmetic is the host model's, step for step (src/quant.rs; every rounding explicit in
// PTX, so no multiply-add is ever fused): the tests compare the kernel's bits with the model's.
//
// Protocol (one launch; every block meets the same block of every peer, barrier.cuh):
//   start barrier   every peer's kernel runs, so it has finished reading its inbox for the
//                   previous call (stream order) and we may overwrite it.
//   phase 1         each rank encodes every shard of its own input and stores shard s into
//                   rank s's inbox, stage-1 slot [rank] (its own shard through its own inbox).
//   mid barrier     (fenced) every contribution to our shard is in our inbox.
//   phase 2         the owner decodes the WORLD contributions in rank order 0..WORLD-1, sums in
//                   fp32, re-encodes its reduced shard and stores it into every rank's inbox,
//                   stage-2 slot [owner].
//   gather barrier  (fenced) every reduced shard is in every inbox.
//   phase 3         every rank decodes every reduced shard into its output: the same bytes on
//                   every rank, so every rank gets the same bits.
// Inputs are read only in phase 1 and the output written only in phase 3, so in place is safe.
// No end barrier: a peer writes our inbox again only after the next call's start barrier,
// which we enter only after phase 3 is done.
//
// A block handles the same groups in every phase on every rank (the same grid-stride formula
// over the same grid): the per-block barriers order exactly the data each block exchanges.
// Four consecutive threads (a quad) own one group, eight values each.

#if !defined(TPCOMM_QUICK_GROUP) || !defined(TPCOMM_BARRIER_GATHER)
#error "compile through tpcomm's module cache: quick defines are missing"
#endif
#if TPCOMM_QUICK_GROUP != 32
#error "the quick kernels are written for groups of 32 values (4 threads x 8)"
#endif

// ---------------------------------------------------------------------------------------------
// IEEE fp32 operations with explicit rounding (mul_rn, add_rn, div_rn, rint_even, fmax_, fmin_)
// and the lanes' butterfly exchange (lane_xor) come from kernels/portable.cuh.

__device__ __forceinline__ bool non_finite(float a) { return (__float_as_uint(a) & 0x7f800000u) == 0x7f800000u; }

// ---------------------------------------------------------------------------------------------
// Codecs. A quad's group is stored as: its 4 `lo` words (16 bytes), its 4 `hi` parts (HI bytes
// each), its scale (4 bytes), each part in its own region of the slot (see Slot).

struct Int8 {
    enum { Q = 128, HI = 4, FP8 = 0, ID = 1 };
};
struct Int6 {
    enum { Q = 32, HI = 2, FP8 = 0, ID = 2 };
};
struct Int4 {
    enum { Q = 8, HI = 0, FP8 = 0, ID = 3 };
};
struct Fp8 {
    enum { Q = 0, HI = 4, FP8 = 1, ID = 0 };
};

// e4m3 with round half to even and saturation at 448 (src/quant.rs `e4m3`), in integer
// arithmetic (GPUs before sm_89 have no fp8 conversion).
__device__ __forceinline__ u32 e4m3_encode_soft(float w) {
    const u32 s = (__float_as_uint(w) >> 24) & 0x80u;
    const float a = fmin_(__uint_as_float(__float_as_uint(w) & 0x7fffffffu), 448.0f);
    if (a < 0.015625f) return s | (u32)rint_even(mul_rn(a, 512.0f));
    const u32 b = __float_as_uint(a);
    const u32 r = b + 0x7ffffu + ((b >> 20) & 1u);
    const int e = (int)(r >> 23) - 127;
    return s | ((u32)(e + 7) << 3) | ((r >> 20) & 7u);
}

// The same through the hardware conversion where there is one: round to nearest even,
// saturating at the largest finite value (448), as the integer version (the GPU tests compare
// both with the host model bit for bit).
__device__ __forceinline__ u32 e4m3_encode(float w) {
#if __CUDA_ARCH__ >= 890
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(w));
    return r & 0xffu;
#else
    return e4m3_encode_soft(w);
#endif
}

__device__ __forceinline__ float e4m3_decode(u32 c) {
    const u32 ex = (c >> 3) & 15u, m = c & 7u;
    const float mag = ex == 0 ? mul_rn((float)m, 0.001953125f) : __uint_as_float(((ex + 120u) << 23) | (m << 20));
    return (c & 0x80u) ? -mag : mag;
}

// A quad's view of one slot of `groups` groups: where group g's parts live.
template <typename C>
struct Slot {
    char* base;
    u64 groups;
    __device__ __forceinline__ u32* lo(u64 g, int lane) const { return (u32*)(base + g * 16 + lane * 4); }
    __device__ __forceinline__ char* hi(u64 g, int lane) const { return base + groups * 16 + (g * 4 + lane) * C::HI; }
    __device__ __forceinline__ float* scale(u64 g) const {
        return (float*)(base + groups * (16 + 4 * C::HI) + g * 4);
    }
};

// Bytes of one slot of `groups` groups, rounded up to 16 (src/backend/quick.rs `slot_bytes`).
template <typename C>
__device__ __forceinline__ u64 slot_bytes(u64 groups) {
    return (groups * (16 + 4 * C::HI + 4) + 15) / 16 * 16;
}

// A quad lane's share of one encoded group: its low word, its high part, the group's scale.
struct Encoded {
    u32 lo, hi;
    float scale;
};

// Encode the quad's 8 values of one group (all four lanes of the quad together).
template <typename C>
__device__ __forceinline__ Encoded encode(const float* v, u32 mask) {
    float mx = v[0], mn = v[0];
    u32 bad = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        mx = fmax_(mx, v[i]);
        mn = fmin_(mn, v[i]);
        bad |= non_finite(v[i]);
    }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        mx = fmax_(mx, __uint_as_float(lane_xor(__float_as_uint(mx), x, mask)));
        mn = fmin_(mn, __uint_as_float(lane_xor(__float_as_uint(mn), x, mask)));
        bad |= lane_xor(bad, x, mask);
    }
    u32 code[8];
    Encoded out;
    const float e = mx >= -mn ? mx : mn;
    const float d = C::FP8 ? div_rn(fmax_(mx, -mn), 448.0f) : mul_rn(e, -1.0f / (float)(C::Q ? C::Q : 1));
    // One division per group: the elements are scaled by the step's reciprocal.
    const float inv = div_rn(1.0f, d);
    if (bad) {
        // A NaN or infinity poisons its group: it decodes to NaN, never to a finite value.
        out.scale = __uint_as_float(0x7fc00000u);
#pragma unroll
        for (int i = 0; i < 8; i++) code[i] = 0;
    } else if (e == 0.0f || d == 0.0f || non_finite(inv)) {
        out.scale = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) code[i] = C::FP8 ? 0u : (u32)C::Q;
    } else {
        out.scale = d;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float w = mul_rn(v[i], inv);
            if (C::FP8) {
                code[i] = e4m3_encode(w);
            } else {
                // The extreme maps to -Q exactly; the clamp catches its opposite (+Q).
                const float c = rint_even(fmin_(fmax_(w, -(float)C::Q), (float)(C::Q - 1)));
                code[i] = (u32)((int)c + C::Q);
            }
        }
    }
    if (C::HI == 4) {
        out.lo = code[0] | code[1] << 8 | code[2] << 16 | code[3] << 24;
        out.hi = code[4] | code[5] << 8 | code[6] << 16 | code[7] << 24;
    } else {
        out.lo = 0;
        out.hi = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            out.lo |= (code[i] & 15u) << (4 * i);
            out.hi |= (code[i] >> 4) << (2 * i);
        }
    }
    return out;
}

// Store a lane's share of an encoded group into `slot` at group `g`.
template <typename C>
__device__ __forceinline__ void store(const Encoded& q, const Slot<C>& slot, u64 g, int lane) {
    *slot.lo(g, lane) = q.lo;
    if (C::HI == 4) *(u32*)slot.hi(g, lane) = q.hi;
    if (C::HI == 2) *(u16*)slot.hi(g, lane) = (u16)q.hi;
    if (lane == 0) *slot.scale(g) = q.scale;
}

// Load and decode the quad's 8 values of group `g` of `slot`, written by a peer in this launch
// (volatile loads: no stale L1 line after the fenced barrier).
template <typename C>
__device__ __forceinline__ void load_decode(const Slot<C>& slot, u64 g, int lane, float* v) {
    const u32 lo = *(const volatile u32*)slot.lo(g, lane);
    const float scale = *(const volatile float*)slot.scale(g);
    u32 code[8];
    if (C::HI == 4) {
        const u32 hi = *(const volatile u32*)slot.hi(g, lane);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            code[i] = (lo >> (8 * i)) & 0xffu;
            code[4 + i] = (hi >> (8 * i)) & 0xffu;
        }
    } else {
        const u32 hi = C::HI == 2 ? (u32) * (const volatile u16*)slot.hi(g, lane) : 0u;
#pragma unroll
        for (int i = 0; i < 8; i++) code[i] = ((lo >> (4 * i)) & 15u) | (((hi >> (2 * i)) & 3u) << 4);
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        v[i] = C::FP8 ? mul_rn(e4m3_decode(code[i]), scale) : mul_rn((float)((int)code[i] - C::Q), scale);
}

// ---------------------------------------------------------------------------------------------
// The quad's 8 elements [first, first + 8) of a message of `count` elements, as fp32 (+0 past
// the end), and back.

template <typename T>
__device__ __forceinline__ void load8(const char* in, u64 first, u64 count, float* v) {
    const typename T::Bits* x = (const typename T::Bits*)in;
    if (first + 8 <= count) {
#pragma unroll
        for (int k = 0; k < 8 / T::PER_VEC; k++) {
            const Vec16 w = ((const Vec16*)(x + first))[k];  // a copy: one 16-byte load, not four
            unpack<T>(w, v + k * T::PER_VEC);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = first + i < count ? T::to_f(x[first + i]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store8(char* out, u64 first, u64 count, const float* v) {
    typename T::Bits* y = (typename T::Bits*)out;
    if (first + 8 <= count) {
#pragma unroll
        for (int k = 0; k < 8 / T::PER_VEC; k++) ((Vec16*)(y + first))[k] = pack<T>(v + k * T::PER_VEC);
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (first + i < count) y[first + i] = T::from_f(v[i]);
    }
}

// Shard r of `groups` groups: [start, start + len), the first groups % WORLD shards one longer.
__device__ __forceinline__ void group_shard(u64 groups, int r, u64* start, u64* len) {
    const u64 base = groups / TPCOMM_WORLD, rem = groups % TPCOMM_WORLD;
    *start = (u64)r * base + ((u64)r < rem ? (u64)r : rem);
    *len = base + ((u64)r < rem ? 1 : 0);
}

// Groups a quad works on per round in phases 1 and 3 (more loads in flight per thread).
#define BATCH 2

// ---------------------------------------------------------------------------------------------
// inbox:  every rank's inbox; each holds stage 1 (WORLD slots, by source rank) then stage 2
//         (WORLD slots, by owner), each slot `slot_bytes(ceil(groups / WORLD))`.
template <typename T, typename C>
__device__ void quick(const Ptrs& sigs, const Ptrs& inbox, const char* in, char* out, int rank, u64 count,
                      u64 timeout_ns, u64* err, u32 tag, const Fault& fault) {
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    Signal* self = (Signal*)pick(sigs, rank);
    const u64 groups = (count + TPCOMM_QUICK_GROUP - 1) / TPCOMM_QUICK_GROUP;
    const u64 per_slot = (groups + TPCOMM_WORLD - 1) / TPCOMM_WORLD;
    const u64 stride = slot_bytes<C>(per_slot);
    const int lane = threadIdx.x & 3;
    const u32 mask = 0xfu << (threadIdx.x & 28);
    const u64 quad = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 2;
    const u64 quads = ((u64)gridDim.x * blockDim.x) >> 2;
    const auto slot = [&](int owner, int stage, int index) {
        return Slot<C>{(char*)pick(inbox, owner) + (u64)(stage * TPCOMM_WORLD + index) * stride, per_slot};
    };
    float v[8];
    u64 start, len;

    if (!barrier<false>(self, sigs, rank, TPCOMM_BARRIER_START, tag, timeout_ns, err, fault, &failed)) return;
    pdl_release_next();  // every peer's block b is resident (common.cuh)
    // Phase 1: our contribution to every shard, into its owner's inbox.
#pragma unroll 1
    for (int s = 0; s < TPCOMM_WORLD; s++) {
        group_shard(groups, s, &start, &len);
        const Slot<C> dst = slot(s, 0, rank);
        // BATCH groups per quad per round: their loads are in flight together.
        for (u64 g0 = quad; g0 < len; g0 += quads * BATCH) {
            float x[BATCH][8];
#pragma unroll
            for (int b = 0; b < BATCH; b++)
                if (g0 + b * quads < len) load8<T>(in, (start + g0 + b * quads) * TPCOMM_QUICK_GROUP + lane * 8, count, x[b]);
#pragma unroll
            for (int b = 0; b < BATCH; b++)
                if (g0 + b * quads < len) store<C>(encode<C>(x[b], mask), dst, g0 + b * quads, lane);
        }
    }
    if (!barrier<true>(self, sigs, rank, TPCOMM_BARRIER_MID, tag, timeout_ns, err, fault, &failed)) return;
    // Phase 2: reduce our shard in rank order, re-encode it, push it to every rank.
    group_shard(groups, rank, &start, &len);
    for (u64 g = quad; g < len; g += quads) {
        float acc[8];
        load_decode<C>(slot(rank, 0, 0), g, lane, acc);
        // Unrolled: the WORLD contributions' loads are in flight together.
#pragma unroll
        for (int r = 1; r < TPCOMM_WORLD; r++) {
            load_decode<C>(slot(rank, 0, r), g, lane, v);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] = add_rn(acc[i], v[i]);
        }
        const u64 first = (start + g) * TPCOMM_QUICK_GROUP + lane * 8;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (first + i >= count) acc[i] = 0.0f;
        // Encoded once, stored into every rank's inbox.
        const Encoded q = encode<C>(acc, mask);
#pragma unroll 1
        for (int p = 0; p < TPCOMM_WORLD; p++) store<C>(q, slot(p, 1, rank), g, lane);
    }
    if (!barrier<true>(self, sigs, rank, TPCOMM_BARRIER_GATHER, tag, timeout_ns, err, fault, &failed)) return;
    // Phase 3: every reduced shard, from our own inbox, into our output.
#pragma unroll 1
    for (int s = 0; s < TPCOMM_WORLD; s++) {
        group_shard(groups, s, &start, &len);
        const Slot<C> src = slot(rank, 1, s);
        for (u64 g0 = quad; g0 < len; g0 += quads * BATCH) {
            float y[BATCH][8];
#pragma unroll
            for (int b = 0; b < BATCH; b++)
                if (g0 + b * quads < len) load_decode<C>(src, g0 + b * quads, lane, y[b]);
#pragma unroll
            for (int b = 0; b < BATCH; b++)
                if (g0 + b * quads < len) store8<T>(out, (start + g0 + b * quads) * TPCOMM_QUICK_GROUP + lane * 8, count, y[b]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points `quick_{codec}_{dtype}`, one signature:
// (signals, inboxes, our input, our output, rank, count, timeout_ns, error word, call tag,
//  fault word, the value to raise it with)

#define TPCOMM_QUICK_ENTRY(NAME, T, C)                                                                       \
    extern "C" __global__ void __launch_bounds__(TPCOMM_THREADS, 2)                                          \
        NAME(Ptrs sigs, Ptrs inbox, const char* in, char* out, int rank, u64 count, u64 timeout_ns, u64* err, \
             u32 tag, u64* fault_word, u64 fault_raise) {                                                    \
        pdl_wait();                                                                                          \
        const Fault fault = {fault_word, fault_raise};                                                       \
        quick<T, C>(sigs, inbox, in, out, rank, count, timeout_ns, err, tag, fault);                         \
    }

TPCOMM_QUICK_ENTRY(quick_fp8_f32, F32, Fp8)
TPCOMM_QUICK_ENTRY(quick_fp8_f16, F16, Fp8)
TPCOMM_QUICK_ENTRY(quick_fp8_bf16, BF16, Fp8)
TPCOMM_QUICK_ENTRY(quick_int8_f32, F32, Int8)
TPCOMM_QUICK_ENTRY(quick_int8_f16, F16, Int8)
TPCOMM_QUICK_ENTRY(quick_int8_bf16, BF16, Int8)
TPCOMM_QUICK_ENTRY(quick_int6_f32, F32, Int6)
TPCOMM_QUICK_ENTRY(quick_int6_f16, F16, Int6)
TPCOMM_QUICK_ENTRY(quick_int6_bf16, BF16, Int6)
TPCOMM_QUICK_ENTRY(quick_int4_f32, F32, Int4)
TPCOMM_QUICK_ENTRY(quick_int4_f16, F16, Int4)
TPCOMM_QUICK_ENTRY(quick_int4_bf16, BF16, Int4)
