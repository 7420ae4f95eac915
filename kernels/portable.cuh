// The few primitives that differ between CUDA and HIP, so that every kernel family is one
// source for both vendors. Compiled first, before common.cuh (src/runtime/kernels.rs).
//
// CUDA: NVRTC without headers; the primitives are the inline PTX the kernels always used, so the
// CUDA code is unchanged. HIP: clang `-x hip -nogpuinc` without headers (hipRTC from ROCm 5.2
// aborts for gfx942), so the CUDA keywords and built-in variables the kernels use are defined
// here on clang's AMDGPU builtins, and 16-bit conversions, the clock and system-scope atomics
// go through clang's own builtins. Nothing in the kernels may assume a warp of 32 lanes.

#if defined(__HIP__)

// --- CUDA keywords and built-in variables, on clang's attributes and AMDGPU builtins ---------
#define __device__ __attribute__((device))
#define __global__ __attribute__((global))
#define __shared__ __attribute__((shared))
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
// __launch_bounds__(threads[, min blocks per SM]): AMDGPU takes the block size only.
#define TPCOMM_FLAT_WORK_GROUP(threads, ...) __attribute__((amdgpu_flat_work_group_size(1, threads)))
#define __launch_bounds__(...) TPCOMM_FLAT_WORK_GROUP(__VA_ARGS__, 0)

// `threadIdx.x` and friends: an rvalue with one member, read from the dispatch registers.
struct TpcommIndex {
    unsigned x;
};
#define threadIdx (TpcommIndex{__builtin_amdgcn_workitem_id_x()})
#define blockIdx (TpcommIndex{__builtin_amdgcn_workgroup_id_x()})
#define blockDim (TpcommIndex{__builtin_amdgcn_workgroup_size_x()})
#define gridDim (TpcommIndex{__builtin_amdgcn_grid_size_x() / __builtin_amdgcn_workgroup_size_x()})

// A block barrier that also orders the block's memory accesses, as CUDA's does.
__device__ __forceinline__ void __syncthreads() {
    __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
    __builtin_amdgcn_s_barrier();
    __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}

// Sequentially consistent at system scope (the empty scope name is the system).
__device__ __forceinline__ void __threadfence_system() { __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, ""); }

// Position of the least significant set bit, from 1; 0 for 0.
__device__ __forceinline__ int __ffs(int x) { return __builtin_ffs(x); }

__device__ __forceinline__ float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
__device__ __forceinline__ unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }

#endif  // __HIP__

// --- 16-bit floats <-> fp32 (round to nearest even; NaN stays NaN) ----------------------------

__device__ __forceinline__ float tpcomm_f16_to_f32(unsigned short b) {
#if defined(__HIP__)
    return (float)__builtin_bit_cast(_Float16, b);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#endif
}

__device__ __forceinline__ unsigned short tpcomm_f32_to_f16(float f) {
#if defined(__HIP__)
    return __builtin_bit_cast(unsigned short, (_Float16)f);
#else
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#endif
}

__device__ __forceinline__ unsigned short tpcomm_f32_to_bf16(float f) {
#if defined(__HIP__)
    // bf16 is the top half of an fp32: round the low half to nearest even; a NaN keeps its top
    // bits with the quiet bit set (an all-zero top mantissa would otherwise read as infinity).
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#else
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#endif
}

// --- Clock ---------------------------------------------------------------------------------

// Nanoseconds of a clock that runs at the same rate on every block of the device.
__device__ __forceinline__ unsigned long long tpcomm_clock_ns() {
#if defined(__HIP__)
    // s_memrealtime: the 100 MHz constant clock of gfx90a and gfx942.
    return __builtin_amdgcn_s_memrealtime() * 10ull;
#else
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
#endif
}

// --- `eq_a == eq_b ? a : b`, a select the optimiser cannot turn into an indexed load ----------
// A chain of selects between a row's entries (kernels/common.cuh, `pick`) is otherwise
// rewritten as one load at a run-time index, which moves the whole row to local memory.
__device__ __forceinline__ unsigned long long tpcomm_select_u64(int eq_a, int eq_b, unsigned long long a,
                                                                unsigned long long b) {
#if defined(__HIP__)
    return eq_a == eq_b ? a : b;
#else
    unsigned long long v;
    asm("{\n\t.reg .pred q;\n\tsetp.eq.s32 q, %1, %2;\n\tselp.b64 %0, %3, %4, q;\n\t}"
        : "=l"(v)
        : "r"(eq_a), "r"(eq_b), "l"(a), "l"(b));
    return v;
#endif
}

// --- 64-bit flags at system scope (peers in other processes and on other GPUs read them):
// release / acquire where data travels with the flag, relaxed for a pure rendezvous ----------

template <bool RELEASE>
__device__ __forceinline__ void tpcomm_st_sys(unsigned long long* addr, unsigned long long v) {
#if defined(__HIP__)
    __hip_atomic_store(addr, v, RELEASE ? __ATOMIC_RELEASE : __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    if (RELEASE)
        asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(addr), "l"(v) : "memory");
    else
        asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(addr), "l"(v) : "memory");
#endif
}

template <bool ACQUIRE>
__device__ __forceinline__ unsigned long long tpcomm_ld_sys(const unsigned long long* addr) {
#if defined(__HIP__)
    return __hip_atomic_load(addr, ACQUIRE ? __ATOMIC_ACQUIRE : __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    unsigned long long v;
    if (ACQUIRE)
        asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(addr) : "memory");
    else
        asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(addr) : "memory");
    return v;
#endif
}

// --- 16 bytes a peer wrote during this launch, read past this core's caches -----------------

__device__ __forceinline__ void tpcomm_ld_volatile_16(const void* addr, unsigned* w) {
#if defined(__HIP__)
    const volatile unsigned* p = (const volatile unsigned*)addr;
    w[0] = p[0];
    w[1] = p[1];
    w[2] = p[2];
    w[3] = p[3];
#else
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "l"(addr)
                 : "memory");
#endif
}

// --- IEEE fp32 arithmetic with explicit rounding: never contracted into FMA, never approximated
// (the quick codecs must give the host model's bits) ------------------------------------------

#if defined(__HIP__)
// HIP divides fp32 correctly rounded by default (-fhip-fp32-correctly-rounded-divide-sqrt);
// contraction is switched off in each function.
__device__ __forceinline__ float mul_rn(float a, float b) {
#pragma clang fp contract(off)
    return a * b;
}
__device__ __forceinline__ float add_rn(float a, float b) {
#pragma clang fp contract(off)
    return a + b;
}
__device__ __forceinline__ float div_rn(float a, float b) { return a / b; }
__device__ __forceinline__ float sqrt_rn(float a) { return __builtin_sqrtf(a); }
__device__ __forceinline__ float rint_even(float a) { return __builtin_rintf(a); }
// maxNum / minNum: a NaN operand yields the other one, as PTX max.f32 / min.f32.
__device__ __forceinline__ float fmax_(float a, float b) { return __builtin_fmaxf(a, b); }
__device__ __forceinline__ float fmin_(float a, float b) { return __builtin_fminf(a, b); }
#else
// One PTX instruction each, so NVRTC can neither contract nor approximate them.
#define TPCOMM_PTX_F32_2(name, insn)                                      \
    __device__ __forceinline__ float name(float a, float b) {             \
        float r;                                                          \
        asm(insn " %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));              \
        return r;                                                         \
    }
TPCOMM_PTX_F32_2(mul_rn, "mul.rn.f32")
TPCOMM_PTX_F32_2(add_rn, "add.rn.f32")
TPCOMM_PTX_F32_2(div_rn, "div.rn.f32")
TPCOMM_PTX_F32_2(fmax_, "max.f32")
TPCOMM_PTX_F32_2(fmin_, "min.f32")
__device__ __forceinline__ float rint_even(float a) {
    float r;
    asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float sqrt_rn(float a) {
    float r;
    asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
#endif

// --- Butterfly exchange among the lanes of a group of 32 consecutive threads (always converged
// where it is used; `mask` names the exchanging lanes of a 32-lane CUDA warp; `x` < 32,
// so on a 64-lane wavefront a lane never leaves its half) --------------------------------------

__device__ __forceinline__ unsigned lane_xor(unsigned v, int x, unsigned mask) {
#if defined(__HIP__)
    (void)mask;
    // Lane within the wavefront (32 or 64 lanes).
    const unsigned lane = __builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
    return (unsigned)__builtin_amdgcn_ds_bpermute((int)((lane ^ (unsigned)x) << 2), (int)v);
#else
    unsigned r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, %3;" : "=r"(r) : "r"(v), "r"(x), "r"(mask));
    return r;
#endif
}

// --- 16-byte stores, and 16 bytes read as two 64-bit words (each single-copy atomic) ----------

__device__ __forceinline__ void tpcomm_st_volatile_16(char* addr, const unsigned* w) {
#if defined(__HIP__)
    volatile unsigned* p = (volatile unsigned*)addr;
    p[0] = w[0];
    p[1] = w[1];
    p[2] = w[2];
    p[3] = w[3];
#else
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(addr), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                 "r"(w[3])
                 : "memory");
#endif
}

__device__ __forceinline__ void tpcomm_ld_volatile_2x64(const char* addr, unsigned long long* w) {
#if defined(__HIP__)
    const volatile unsigned long long* p = (const volatile unsigned long long*)addr;
    w[0] = p[0];
    w[1] = p[1];
#else
    asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(w[0]), "=l"(w[1]) : "l"(addr) : "memory");
#endif
}

__device__ __forceinline__ void tpcomm_st_volatile_2x64(char* addr, unsigned long long a, unsigned long long b) {
#if defined(__HIP__)
    volatile unsigned long long* p = (volatile unsigned long long*)addr;
    p[0] = a;
    p[1] = b;
#else
    asm volatile("st.volatile.global.v2.u64 [%0], {%1, %2};" ::"l"(addr), "l"(a), "l"(b) : "memory");
#endif
}
