// Packet allreduce: barrier-free small messages, f32 / f16 / bf16.
//
// Types and memory helpers come from kernels/common.cuh, prepended by the module cache.
//
// Data travels with its own proof of arrival, so no rank ever waits for a barrier: a receiver
// polls the very words the sender wrote. Every rank pushes (writes into peers' memory) and
// reads only its own memory, so no input is ever read by a peer: in place is free, and no
// buffer has to be registered (CUDA graphs need no address exchange after capture).
//
// Three algorithms:
//   packet   (LL, all-pairs)  every rank pushes its whole input to every peer as LL packets,
//                             then sums all n contributions locally.
//   packet2  (LL, two-phase)  vector i goes to its owner only (shards as in two-shot); the
//                             owner sums and pushes the result to every peer.
//   lamport                   like all-pairs but raw data, no flags: receive slots hold a
//                             sentinel until the data lands, and are re-armed one call later.
//
// Compiled with these defines (from src/cuda/protocol.rs) besides those of common.cuh:
//   TPCOMM_PACKET_MAX_BLOCKS  blocks the per-block counters exist for
//   TPCOMM_PACKET_THREADS     threads per block of every launch
//   TPCOMM_LAMPORT_GENS       Lamport buffer generations (3)
//   TPCOMM_WAIT_*             wait ids reported in the error word
//   TPCOMM_ERR_TIMEOUT / _MISMATCH  error word kind bits
//
// Results: element i is sum(x_r[i] for r = 0..WORLD-1) in that order, in fp32, rounded once,
// the first term taken as is: the same bits as the custom kernels and as
// tpcomm::dtype::reference_sum, whatever the algorithm, grid or message size.

#if !defined(TPCOMM_PACKET_MAX_BLOCKS) || !defined(TPCOMM_PACKET_THREADS) || !defined(TPCOMM_LAMPORT_GENS) || \
    !defined(TPCOMM_WAIT_HEADER) || !defined(TPCOMM_WAIT_DATA) || !defined(TPCOMM_WAIT_RESULT) ||            \
    !defined(TPCOMM_ERR_TIMEOUT) || !defined(TPCOMM_ERR_MISMATCH)
#error "compile through tpcomm's module cache: protocol defines are missing"
#endif
#if TPCOMM_LAMPORT_GENS != 3
#error "the Lamport kernel is written for three generations"
#endif

// One rank's private state (device memory, zeroed at set-up). Kept on the device, never in
// kernel arguments, so a replayed CUDA graph continues the sequence instead of repeating it.
// Every block keeps its own copy of each counter (no block waits for another to read it);
// block 0 also advances the copies of blocks the launch does not have, so all copies always
// equal the number of calls made, whatever grid each call used.
struct PacketState {
    u32 ll_epoch[TPCOMM_PACKET_MAX_BLOCKS];     // LL calls made (0 skipped on wrap)
    u32 lamport_gen[TPCOMM_PACKET_MAX_BLOCKS];  // generation of the last Lamport call
    u32 lamport_used[TPCOMM_LAMPORT_GENS];      // slots per source the last call of each generation filled
};

// ---------------------------------------------------------------------------------------------
// LL packets.
//
// One 16-byte packet carries 8 bytes of data as two 64-bit words, each (flag << 32 | data). A
// naturally aligned 64-bit access is single-copy atomic, so a word whose flag is this call's
// epoch holds this call's data, whatever order the two words land in. A 16-byte vector is two
// packets. The flag is the call's epoch; scratch is double-buffered by epoch parity: a peer
// writes epoch e + 2 into our parity-(e & 1) slots only after it received our epoch e + 1
// packets (every call exchanges at least a header with every peer), which we send only after
// our kernel of epoch e, the last reader of those slots, has finished (stream order).
//
// Scratch of one rank: [parity 2][source WORLD][slots] packets; slot 0 of each region is the
// call header (the call tag, so ranks making different calls stop with a mismatch), slots
// 1 + 2i and 2 + 2i hold vector i. The layout depends only on the slot count, never on the
// message size or the grid.

__device__ __forceinline__ void st_packet(char* addr, u32 d0, u32 d1, u32 flag) {
    const u64 a = ((u64)flag << 32) | d0, b = ((u64)flag << 32) | d1;
    asm volatile("st.volatile.global.v2.u64 [%0], {%1, %2};" ::"l"(addr), "l"(a), "l"(b) : "memory");
}

__device__ __forceinline__ bool ld_packet(const char* addr, u32 flag, u32* d0, u32* d1) {
    u64 a, b;
    asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(addr) : "memory");
    *d0 = (u32)a;
    *d1 = (u32)b;
    return (u32)(a >> 32) == flag && (u32)(b >> 32) == flag;
}

__device__ __forceinline__ void st_vec_packets(char* addr, const Vec16& v, u32 flag) {
    st_packet(addr, v.w[0], v.w[1], flag);
    st_packet(addr + 16, v.w[2], v.w[3], flag);
}

__device__ __forceinline__ bool ld_vec_packets(const char* addr, u32 flag, Vec16* v) {
    const bool lo = ld_packet(addr, flag, &v->w[0], &v->w[1]);
    const bool hi = ld_packet(addr + 16, flag, &v->w[2], &v->w[3]);
    return lo && hi;
}

// The next epoch: never 0 (fresh scratch is zero), and parities keep alternating on wrap.
__device__ __forceinline__ u32 next_epoch(u32 e) {
    return e + 1 == 0 ? 2 : e + 1;
}

// ---------------------------------------------------------------------------------------------
// Shared pieces.

// Vector i of a message of `count` elements; lanes past the end read as 0 (never stored).
template <typename T>
__device__ __forceinline__ Vec16 load_vec(const char* in, u64 i, u64 count) {
    const u64 first = i * T::PER_VEC;
    if (first + T::PER_VEC <= count) return ((const Vec16*)in)[i];
    Vec16 v = {{0, 0, 0, 0}};
    typename T::Bits* lanes = (typename T::Bits*)&v;
    for (u64 j = first; j < count; j++) lanes[j - first] = ((const typename T::Bits*)in)[j];
    return v;
}

// Store vector i, only the lanes inside the message.
template <typename T>
__device__ __forceinline__ void store_vec(char* out, u64 i, u64 count, const Vec16& v) {
    const u64 first = i * T::PER_VEC;
    if (first + T::PER_VEC <= count) {
        ((Vec16*)out)[i] = v;
        return;
    }
    const typename T::Bits* lanes = (const typename T::Bits*)&v;
    for (u64 j = first; j < count; j++) ((typename T::Bits*)out)[j] = lanes[j - first];
}

// Record a failure in the host-visible error word (a mismatch overrides a timeout: it is the
// cause) and make the whole block leave.
__device__ __noinline__ void fail(u64* err, volatile int* failed, u64 kind, u32 where, int peer) {
    volatile u64* e = err;
    if (kind == TPCOMM_ERR_MISMATCH || *e == 0) *e = kind | ((u64)where << 32) | ((u64)peer << 16) | blockIdx.x;
    __threadfence_system();
    *failed = 1;
}

// After the block's last access to its counter copy, store `value` there (and, from block 0,
// into the copies of blocks this launch does not have).
__device__ __forceinline__ void finish_block(u32* per_block, u32 value) {
    __syncthreads();
    if (threadIdx.x == 0) per_block[blockIdx.x] = value;
    if (blockIdx.x == 0)
        for (u32 b = gridDim.x + threadIdx.x; b < TPCOMM_PACKET_MAX_BLOCKS; b += blockDim.x) per_block[b] = value;
}

// Sum of vector i over all ranks in rank order: our own vector `mine`, the peers' from `get`,
// which polls each pending peer once and says whether its vector has landed. All pending
// peers are polled in one sweep (their loads overlap); a sweep repeats until all have landed,
// the deadline passes or another thread of the block failed.
template <typename T, typename Get>
__device__ __forceinline__ bool sum_arrivals(const Vec16& mine, int rank, Get get, u64 deadline, u64* err,
                                             volatile int* failed, Vec16* result) {
    Vec16 got[TPCOMM_WORLD];
    u32 pending = ((1u << TPCOMM_WORLD) - 1) & ~(1u << rank);
#pragma unroll
    for (int r = 0; r < TPCOMM_WORLD; r++)
        if (r == rank) got[r] = mine;
    while (pending) {
#pragma unroll
        for (int r = 0; r < TPCOMM_WORLD; r++)
            if ((pending >> r) & 1)
                if (get(r, &got[r])) pending &= ~(1u << r);
        if (pending && (*failed || globaltimer() > deadline)) {
            if (!*failed) fail(err, failed, TPCOMM_ERR_TIMEOUT, TPCOMM_WAIT_DATA, __ffs(pending) - 1);
            return false;
        }
    }
    float acc[T::PER_VEC];
    unpack<T>(got[0], acc);
#pragma unroll
    for (int r = 1; r < TPCOMM_WORLD; r++) unpack_add<T>(got[r], acc);
    *result = pack<T>(acc);
    return true;
}

// ---------------------------------------------------------------------------------------------
// LL kernels.

// Where things live for one LL call.
struct LLCall {
    u32 e;            // epoch = flag value
    u64 region;       // bytes per source region
    u64 send_off;     // offset of our region inside any peer's scratch
    const char* own;  // our scratch, current parity: region of source r at own + r * region
};

__device__ __forceinline__ LLCall ll_call(PacketState* st, const Ptrs& scratch, int rank, u64 slots) {
    LLCall c;
    c.e = next_epoch(st->ll_epoch[blockIdx.x]);
    c.region = slots * 16;
    const u64 parity_base = (u64)(c.e & 1) * TPCOMM_WORLD * c.region;
    c.send_off = parity_base + (u64)rank * c.region;
    c.own = (const char*)scratch.p[rank] + parity_base;
    return c;
}

// Block 0 sends the call header to every peer; threads < WORLD of every block then check the
// header every peer sent us: a different tag means another call (length, dtype, algorithm).
__device__ __forceinline__ void ll_headers(const LLCall& c, const Ptrs& scratch, int rank, u32 tag, u64 deadline,
                                           u64* err, volatile int* failed) {
    const int q = threadIdx.x;
    if (q >= TPCOMM_WORLD || q == rank) return;
    if (blockIdx.x == 0) st_packet((char*)scratch.p[q] + c.send_off, tag, tag, c.e);
    u32 t0, t1;
    while (!ld_packet(c.own + (u64)q * c.region, c.e, &t0, &t1)) {
        if (*failed) return;
        if (globaltimer() > deadline) {
            fail(err, failed, TPCOMM_ERR_TIMEOUT, TPCOMM_WAIT_HEADER, q);
            return;
        }
    }
    if (t0 != tag) fail(err, failed, TPCOMM_ERR_MISMATCH, TPCOMM_WAIT_HEADER, q);
}

// All-pairs: push every vector to every peer, then sum what arrived.
template <typename T>
__device__ void ll_allpairs(const char* in, char* out, const Ptrs& scratch, PacketState* st, int rank, u64 count,
                            u64 slots, u64 timeout_ns, u64* err, u32 tag) {
    __shared__ volatile int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    const u64 deadline = globaltimer() + timeout_ns;
    const LLCall c = ll_call(st, scratch, rank, slots);
    const u64 nvec = (count + T::PER_VEC - 1) / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    // Push first: no thread waits before all of its vectors are on their way.
    for (u64 i = tid; i < nvec; i += stride) {
        const Vec16 v = load_vec<T>(in, i, count);
#pragma unroll
        for (int q = 0; q < TPCOMM_WORLD; q++)
            if (q != rank) st_vec_packets((char*)scratch.p[q] + c.send_off + (1 + 2 * i) * 16, v, c.e);
    }
    ll_headers(c, scratch, rank, tag, deadline, err, &failed);
    for (u64 i = tid; i < nvec; i += stride) {
        const u64 at = (1 + 2 * i) * 16;
        auto get = [&](int r, Vec16* v) { return ld_vec_packets(c.own + (u64)r * c.region + at, c.e, v); };
        Vec16 sum;
        // In place is safe: this thread read in[i] (above and here) before writing out[i].
        if (!sum_arrivals<T>(load_vec<T>(in, i, count), rank, get, deadline, err, &failed, &sum)) break;
        store_vec<T>(out, i, count, sum);
    }
    finish_block(st->ll_epoch, c.e);
}

// Owner of vector i: the rank whose two-shot shard holds it (first nvec % WORLD shards one longer).
__device__ __forceinline__ int owner_of(u64 i, u64 nvec) {
    const u64 base = nvec / TPCOMM_WORLD, rem = nvec % TPCOMM_WORLD;
    const u64 split = rem * (base + 1);
    return i < split ? (int)(i / (base + 1)) : (int)(rem + (i - split) / base);
}

// Two-phase: vector i goes to its owner as packets; the owner sums the n contributions in rank
// order and pushes the result to every peer as packets, into the region named after itself.
// Phase-1 packets for vector i land in the owner's scratch only, phase-2 packets in the other
// ranks' scratch only, so the two phases never share a slot although they share the epoch.
// Each thread handles the same i in every phase, so in place is safe.
template <typename T>
__device__ void ll_twophase(const char* in, char* out, const Ptrs& scratch, PacketState* st, int rank, u64 count,
                            u64 slots, u64 timeout_ns, u64* err, u32 tag) {
    __shared__ volatile int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    const u64 deadline = globaltimer() + timeout_ns;
    const LLCall c = ll_call(st, scratch, rank, slots);
    const u64 nvec = (count + T::PER_VEC - 1) / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    // 1. Scatter: every vector we do not own goes to its owner.
    for (u64 i = tid; i < nvec; i += stride) {
        const int o = owner_of(i, nvec);
        if (o != rank) st_vec_packets((char*)scratch.p[o] + c.send_off + (1 + 2 * i) * 16, load_vec<T>(in, i, count), c.e);
    }
    ll_headers(c, scratch, rank, tag, deadline, err, &failed);
    // 2. Reduce our shard and broadcast it. Waits only on phase 1, which never waits.
    for (u64 i = tid; i < nvec; i += stride) {
        if (owner_of(i, nvec) != rank) continue;
        const u64 at = (1 + 2 * i) * 16;
        auto get = [&](int r, Vec16* v) { return ld_vec_packets(c.own + (u64)r * c.region + at, c.e, v); };
        Vec16 sum;
        if (!sum_arrivals<T>(load_vec<T>(in, i, count), rank, get, deadline, err, &failed, &sum)) break;
        store_vec<T>(out, i, count, sum);
#pragma unroll
        for (int q = 0; q < TPCOMM_WORLD; q++)
            if (q != rank) st_vec_packets((char*)scratch.p[q] + c.send_off + at, sum, c.e);
    }
    // 3. Gather every other shard from its owner. Waits only on phase 2.
    for (u64 i = tid; i < nvec && !failed; i += stride) {
        const int o = owner_of(i, nvec);
        if (o == rank) continue;
        Vec16 v;
        const char* src = c.own + (u64)o * c.region + (1 + 2 * i) * 16;
        while (!ld_vec_packets(src, c.e, &v)) {
            if (failed) break;
            if (globaltimer() > deadline) {
                fail(err, &failed, TPCOMM_ERR_TIMEOUT, TPCOMM_WAIT_RESULT, o);
                break;
            }
        }
        if (failed) break;
        store_vec<T>(out, i, count, v);
    }
    finish_block(st->ll_epoch, c.e);
}

// ---------------------------------------------------------------------------------------------
// Lamport push.
//
// Receive buffers of one rank: [generation 3][source WORLD][slots] vectors, every 32-bit word
// the sentinel 0xffffffff until a peer's data lands (a 32-bit access is single-copy atomic, so
// a word is either the sentinel or the data). A data word equal to the sentinel (a NaN) is sent
// as 0xfffffffe (still a NaN; an fp32 sum with a NaN is the canonical NaN either way). Slot 0
// of each region is the call header (the tag, never the sentinel), vector i is slot 1 + i.
// Calls rotate through the generations; each call re-arms (refills with the sentinel) what the
// previous call received. A peer writes generation g again three calls later, only after our
// data of the call in between, which we send after the re-arming call has finished.

__device__ __forceinline__ bool ld_lamport(const char* addr, Vec16* v) {
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v->w[0]), "=r"(v->w[1]), "=r"(v->w[2]), "=r"(v->w[3])
                 : "l"(addr)
                 : "memory");
    return v->w[0] != 0xffffffffu && v->w[1] != 0xffffffffu && v->w[2] != 0xffffffffu && v->w[3] != 0xffffffffu;
}

__device__ __forceinline__ void st_lamport(char* addr, const Vec16& v) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(addr), "r"(v.w[0]), "r"(v.w[1]),
                 "r"(v.w[2]), "r"(v.w[3])
                 : "memory");
}

template <typename T>
__device__ void lamport(const char* in, char* out, const Ptrs& bufs, PacketState* st, int rank, u64 count, u64 slots,
                        u64 timeout_ns, u64* err, u32 tag) {
    __shared__ volatile int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    const u64 deadline = globaltimer() + timeout_ns;
    const u32 prev = st->lamport_gen[blockIdx.x];
    const u32 gen = prev + 1 == TPCOMM_LAMPORT_GENS ? 0 : prev + 1;
    const u64 region = slots * 16;
    const u64 send_off = ((u64)gen * TPCOMM_WORLD + rank) * region;
    const char* own = (const char*)bufs.p[rank] + (u64)gen * TPCOMM_WORLD * region;
    const u64 nvec = (count + T::PER_VEC - 1) / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    if (blockIdx.x == 0 && threadIdx.x < TPCOMM_WORLD && threadIdx.x != rank) {
        const Vec16 h = {{tag, tag, tag, tag}};
        st_lamport((char*)bufs.p[threadIdx.x] + send_off, h);
    }
    for (u64 i = tid; i < nvec; i += stride) {
        Vec16 v = load_vec<T>(in, i, count);
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (v.w[k] == 0xffffffffu) v.w[k] = 0xfffffffeu;
#pragma unroll
        for (int q = 0; q < TPCOMM_WORLD; q++)
            if (q != rank) st_lamport((char*)bufs.p[q] + send_off + (1 + i) * 16, v);
    }
    // Re-arm what the previous call received, while the peers' data is on its way.
    {
        const u64 used = st->lamport_used[prev];
        char* base = (char*)bufs.p[rank] + (u64)prev * TPCOMM_WORLD * region;
        const Vec16 s = {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}};
        for (u64 k = tid; k < used * TPCOMM_WORLD; k += stride) {
            const u64 src = k / used;
            if (src != (u64)rank) st_lamport(base + src * region + (k % used) * 16, s);
        }
    }
    if (threadIdx.x < TPCOMM_WORLD && threadIdx.x != rank) {
        const int q = threadIdx.x;
        Vec16 h;
        while (!ld_lamport(own + (u64)q * region, &h)) {
            if (failed) break;
            if (globaltimer() > deadline) {
                fail(err, &failed, TPCOMM_ERR_TIMEOUT, TPCOMM_WAIT_HEADER, q);
                break;
            }
        }
        if (!failed && h.w[0] != tag) fail(err, &failed, TPCOMM_ERR_MISMATCH, TPCOMM_WAIT_HEADER, q);
    }
    for (u64 i = tid; i < nvec; i += stride) {
        const u64 at = (1 + i) * 16;
        auto get = [&](int r, Vec16* v) { return ld_lamport(own + (u64)r * region + at, v); };
        Vec16 sum;
        if (!sum_arrivals<T>(load_vec<T>(in, i, count), rank, get, deadline, err, &failed, &sum)) break;
        store_vec<T>(out, i, count, sum);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) st->lamport_used[gen] = 1 + nvec;
    finish_block(st->lamport_gen, gen);
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per (algorithm, dtype), all with one signature:
// (input, output, every rank's scratch, our state, rank, count, slots per source region,
//  timeout_ns, error word, call tag)

#define TPCOMM_PACKET_ENTRY(NAME, ALGO, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(TPCOMM_PACKET_THREADS)                                         \
        NAME(const char* in, char* out, Ptrs scratch, PacketState* st, int rank, u64 count, u64 slots, \
             u64 timeout_ns, u64* err, u32 tag) {                                                               \
        ALGO<T>(in, out, scratch, st, rank, count, slots, timeout_ns, err, tag);                                \
    }

TPCOMM_PACKET_ENTRY(packet_f32, ll_allpairs, F32)
TPCOMM_PACKET_ENTRY(packet_f16, ll_allpairs, F16)
TPCOMM_PACKET_ENTRY(packet_bf16, ll_allpairs, BF16)
TPCOMM_PACKET_ENTRY(packet2_f32, ll_twophase, F32)
TPCOMM_PACKET_ENTRY(packet2_f16, ll_twophase, F16)
TPCOMM_PACKET_ENTRY(packet2_bf16, ll_twophase, BF16)
TPCOMM_PACKET_ENTRY(lamport_f32, lamport, F32)
TPCOMM_PACKET_ENTRY(lamport_f16, lamport, F16)
TPCOMM_PACKET_ENTRY(lamport_bf16, lamport, BF16)
