// Shared by every tpcomm kernel family: element types, 16-byte vectors, memory access helpers.
//
// Self-contained on purpose: no CUDA or HIP headers (NVRTC on users' machines may have none);
// what differs between the vendors (16-bit conversions, the clock, system-scope flags) comes
// from kernels/portable.cuh, compiled just before this file. The module cache prepends both to
// each family's source (src/runtime/kernels.rs), so every family is compiled with the same
// helpers and the same fp32 rank-order arithmetic.
//
// Defines every family passes (from src/runtime/protocol.rs):
//   TPCOMM_WORLD        ranks of this module (1..=TPCOMM_MAX_RANKS)
//   TPCOMM_MAX_RANKS    width of every per-rank table (`struct Ptrs`)
//   TPCOMM_VEC_BYTES    bytes per vector access (16)
//   TPCOMM_ERR_*        kind bits of the host-visible error word
//   TPCOMM_FAULT_POLLS  waits read the group's fault word once per this many polls

#if !defined(TPCOMM_WORLD) || !defined(TPCOMM_MAX_RANKS) || !defined(TPCOMM_VEC_BYTES) ||           \
    !defined(TPCOMM_ERR_TIMEOUT) || !defined(TPCOMM_ERR_MISMATCH) || !defined(TPCOMM_ERR_PEER_FAILED) || \
    !defined(TPCOMM_ERR_BAD_ROW) || !defined(TPCOMM_FAULT_POLLS)
#error "compile through tpcomm's module cache: protocol defines are missing"
#endif
#if TPCOMM_WORLD < 1 || TPCOMM_WORLD > TPCOMM_MAX_RANKS
#error "TPCOMM_WORLD out of range"
#endif
#if TPCOMM_VEC_BYTES != 16
#error "the kernels are written for 16-byte vectors"
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// A row of device addresses, one per rank: a rank-data row (one registered buffer as seen by
// every rank) or, passed by value, the peers' signal or scratch areas.
struct Ptrs {
    u64 p[TPCOMM_MAX_RANKS];
};

// Entry `i` of a row for a run-time `i` below TPCOMM_WORLD. `row.p[i]` (or any expression the
// optimiser reduces to it, such as `r == i && row.p[r] == x` over r) keeps the whole row in local
// memory, and then every access through the row, the data loops' included, reloads its entries
// from there; selects over compile-time indices keep the entries in registers.
__device__ __forceinline__ u64 pick(const Ptrs& row, int i) {
    u64 v = row.p[0];
#pragma unroll
    for (int r = 1; r < TPCOMM_WORLD; r++) v = tpcomm_select_u64(i, r, row.p[r], v);
    return v;
}

struct __align__(16) Vec16 {
    u32 w[4];
};

// ---------------------------------------------------------------------------------------------
// Element types: raw bits <-> fp32.

struct F32 {
    typedef u32 Bits;
    enum { PER_VEC = 4 };
    static __device__ __forceinline__ float to_f(u32 b) { return __uint_as_float(b); }
    static __device__ __forceinline__ u32 from_f(float f) { return __float_as_uint(f); }
};

struct F16 {
    typedef u16 Bits;
    enum { PER_VEC = 8 };
    static __device__ __forceinline__ float to_f(u16 b) { return tpcomm_f16_to_f32(b); }
    static __device__ __forceinline__ u16 from_f(float f) { return tpcomm_f32_to_f16(f); }
};

struct BF16 {
    typedef u16 Bits;
    enum { PER_VEC = 8 };
    // bf16 is the top half of an fp32: widening is exact.
    static __device__ __forceinline__ float to_f(u16 b) { return __uint_as_float(((u32)b) << 16); }
    static __device__ __forceinline__ u16 from_f(float f) { return tpcomm_f32_to_bf16(f); }
};

template <typename T>
__device__ __forceinline__ u32 lane_bits(const Vec16& v, int i) {
    if (T::PER_VEC == 4) return v.w[i];
    return (v.w[i >> 1] >> ((i & 1) * 16)) & 0xffffu;
}

template <typename T>
__device__ __forceinline__ void unpack(const Vec16& v, float* acc) {
#pragma unroll
    for (int i = 0; i < T::PER_VEC; i++) acc[i] = T::to_f((typename T::Bits)lane_bits<T>(v, i));
}

template <typename T>
__device__ __forceinline__ void unpack_add(const Vec16& v, float* acc) {
#pragma unroll
    for (int i = 0; i < T::PER_VEC; i++) acc[i] += T::to_f((typename T::Bits)lane_bits<T>(v, i));
}

template <typename T>
__device__ __forceinline__ Vec16 pack(const float* acc) {
    Vec16 v;
    if (T::PER_VEC == 4) {
#pragma unroll
        for (int i = 0; i < 4; i++) v.w[i] = (u32)T::from_f(acc[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++)
            v.w[i] = (u32)T::from_f(acc[2 * i]) | ((u32)T::from_f(acc[2 * i + 1]) << 16);
    }
    return v;
}

// ---------------------------------------------------------------------------------------------
// Memory access helpers.

__device__ __forceinline__ u64 globaltimer() { return tpcomm_clock_ns(); }

// The group's fault word (a page of node-shared host memory mapped into the device): nonzero
// once any rank of the node failed or aborted. Kernels read it only while they already wait (a
// read of host memory is slow), and store `raise` into it when they fail themselves, so every
// other kernel of the node stops waiting and every host sees the failure at its next call.
struct Fault {
    volatile u64* word;
    u64 raise;
    __device__ __forceinline__ bool raised() const { return *word != 0; }
    __device__ __forceinline__ void raise_now() const {
        if (*word == 0) *word = raise;
        __threadfence_system();
    }
};

// Programmatic dependent launch (sm_90 and newer; no-ops before, and on launches that do not
// ask for it). Every kernel first waits until the previous kernel of its stream has finished
// and its memory is visible (`pdl_wait`): nothing of a kernel touches memory before its
// predecessor is done, so calls keep their stream order.
//
// When the next kernel may be scheduled (`pdl_release_next`) is what keeps ranks sharing a GPU
// from starving each other. A collective kernel releases its successor only once it knows that
// every peer's kernel of the same call is resident: after its start barrier (every peer's same
// block has arrived), or, for packets, once the thread has received data that every peer's
// same block sent. Then whenever a rank's next kernel takes SM slots while this one runs, every
// rank's kernel of this call already holds its own slots and finishes without needing more,
// so one call's grid per rank (the co-residency cap) is all that must fit; a successor released
// at the start instead could fill the GPU before a slow peer's kernel of this call got its
// blocks in (seen: long graphs deadlocked). The first release by any thread of a block counts
// for the block (PTX: repeated invocations have no further effect), so each call site must be
// one where that thread already holds the proof.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A bounded wait: the clock is read only every 64 polls and the deadline is set at the first
// read, so a wait that succeeds at once never touches %globaltimer (a slow register) and a
// spinning loop stays tight; the fault word is read every TPCOMM_FAULT_POLLS polls. Each wait is
// bounded by `timeout_ns` on its own. `check` returns 0 to keep waiting, else the error kind
// (TPCOMM_ERR_TIMEOUT, or TPCOMM_ERR_PEER_FAILED when another rank failed meanwhile).
struct Spin {
    u64 deadline;
    u32 polls;
    __device__ __forceinline__ Spin() : deadline(0), polls(0) {}
    __device__ __forceinline__ u64 check(u64 timeout_ns, const Fault& fault) {
        if ((++polls & 63) != 0) return 0;
        if ((polls % TPCOMM_FAULT_POLLS) == 0 && fault.raised()) return TPCOMM_ERR_PEER_FAILED;
        const u64 now = globaltimer();
        if (deadline == 0) deadline = now + timeout_ns;
        return now > deadline ? TPCOMM_ERR_TIMEOUT : 0;
    }
};

__device__ __forceinline__ void st_release_sys(u64* addr, u64 v) { tpcomm_st_sys<true>(addr, v); }
__device__ __forceinline__ u64 ld_acquire_sys(const u64* addr) { return tpcomm_ld_sys<true>(addr); }
__device__ __forceinline__ void st_relaxed_sys(u64* addr, u64 v) { tpcomm_st_sys<false>(addr, v); }
__device__ __forceinline__ u64 ld_relaxed_sys(const u64* addr) { return tpcomm_ld_sys<false>(addr); }

// Data a peer wrote during this launch (two-shot scratch) is read with volatile loads, so no
// stale copy in this SM's L1 can be returned after the acquire barrier.
__device__ __forceinline__ Vec16 ld_volatile_v4(const void* addr) {
    Vec16 v;
    tpcomm_ld_volatile_16(addr, v.w);
    return v;
}

template <typename T>
__device__ __forceinline__ typename T::Bits ld_volatile_elem(const void* addr) {
    return *(const volatile typename T::Bits*)addr;
}
