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
//                             sentinel until the data lands, and the reader re-arms each slot
//                             as soon as it has read it.
//
// Compiled with these defines (from src/runtime/protocol.rs) besides those of common.cuh:
//   TPCOMM_PACKET_MAX_BLOCKS  blocks the per-block counters exist for
//   TPCOMM_PACKET_THREADS     most data threads per block (every block adds one header warp)
//   TPCOMM_LAMPORT_GENS       Lamport buffer generations (2)
//   TPCOMM_WAIT_*             wait ids reported in the error word
//
// Results: element i is sum(x_r[i] for r = 0..WORLD-1) in that order, in fp32, rounded once,
// the first term taken as is: the same bits as the custom kernels and as
// tpcomm::dtype::reference_sum, whatever the algorithm, grid or message size.

#if !defined(TPCOMM_PACKET_MAX_BLOCKS) || !defined(TPCOMM_PACKET_THREADS) || !defined(TPCOMM_LAMPORT_GENS) || \
    !defined(TPCOMM_WAIT_HEADER) || !defined(TPCOMM_WAIT_DATA) || !defined(TPCOMM_WAIT_RESULT)
#error "compile through tpcomm's module cache: protocol defines are missing"
#endif
#if TPCOMM_LAMPORT_GENS != 2
#error "the Lamport kernel is written for two generations"
#endif

// One rank's private state (device memory, zeroed at set-up). Kept on the device, never in
// kernel arguments, so a replayed CUDA graph continues the sequence instead of repeating it.
// Every block keeps its own copy of each counter (no block waits for another to read it);
// block 0 also advances the copies of blocks the launch does not have, so all copies always
// equal the number of calls made, whatever grid each call used.
struct PacketState {
    u32 ll_epoch[TPCOMM_PACKET_MAX_BLOCKS];     // LL calls made (0 skipped on wrap)
    u32 lamport_gen[TPCOMM_PACKET_MAX_BLOCKS];  // generation of the last Lamport call
};

// ---------------------------------------------------------------------------------------------
// Shared pieces.

// The next epoch: never 0 (fresh scratch is zero), and parities keep alternating on wrap.
__device__ __forceinline__ u32 next_epoch(u32 e) {
    return e + 1 == 0 ? 2 : e + 1;
}

// Vector i of a message of `count` elements; lanes past the end read as 0 (never stored).
// The tails index lanes at compile time: a lane chosen at run time would move the vector, and
// every vector of the same variable on the fast path too, to local memory.
template <typename T>
__device__ __forceinline__ Vec16 load_vec(const char* in, u64 i, u64 count) {
    const u64 first = i * T::PER_VEC;
    if (first + T::PER_VEC <= count) return ((const Vec16*)in)[i];
    Vec16 v = {{0, 0, 0, 0}};
    const typename T::Bits* x = (const typename T::Bits*)in;
#pragma unroll
    for (int k = 0; k < T::PER_VEC; k++)
        if (first + k < count) v.w[k * sizeof(x[0]) / 4] |= (u32)x[first + k] << (k * sizeof(x[0]) * 8 % 32);
    return v;
}

// Store vector i, only the lanes inside the message.
template <typename T>
__device__ __forceinline__ void store_vec(char* out, u64 i, u64 count, const Vec16 v) {
    const u64 first = i * T::PER_VEC;
    if (first + T::PER_VEC <= count) {
        ((Vec16*)out)[i] = v;
        return;
    }
    typename T::Bits* y = (typename T::Bits*)out;
#pragma unroll
    for (int k = 0; k < T::PER_VEC; k++)
        if (first + k < count) y[first + k] = (typename T::Bits)lane_bits<T>(v, k);
}

// Record a failure in the host-visible error word, raise the group's fault word (unless another
// rank raised it: then this rank only stops waiting) and make the whole block leave. Priority:
// a mismatch (the cause) over a missing header (the peer never started this call) over any
// other timeout (which may only wait on a rank that itself waits for the missing peer).
__device__ __noinline__ void fail(u64* err, volatile int* failed, const Fault& fault, u64 kind, u32 where, int peer) {
    volatile u64* e = err;
    const u64 old = *e;
    const bool old_header = old != 0 && ((old >> 32) & 0xff) == TPCOMM_WAIT_HEADER;
    bool take;
    if (kind == TPCOMM_ERR_MISMATCH)
        take = !(old & TPCOMM_ERR_MISMATCH);
    else if (where == TPCOMM_WAIT_HEADER && kind == TPCOMM_ERR_TIMEOUT)
        take = old == 0 || (!(old & TPCOMM_ERR_MISMATCH) && !old_header);
    else
        take = old == 0;
    if (take) *e = kind | ((u64)where << 32) | ((u64)peer << 16) | blockIdx.x;
    if (kind != TPCOMM_ERR_PEER_FAILED) fault.raise_now();
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

// ---------------------------------------------------------------------------------------------
// Wire formats: how a peer's vector is read from our memory and how we know it has landed.
// `load` only issues the loads; `ready` looks at the values. Polling several peers loads from
// all of them first, so their round trips overlap instead of adding up.

// LL packets.
//
// One 16-byte packet carries 8 bytes of data as two 64-bit words, each (flag << 32 | data). A
// naturally aligned 64-bit access is single-copy atomic, so a word whose flag is this call's
// epoch holds this call's data, whatever order the words land in. A 16-byte vector is two
// packets. The flag is the call's epoch; scratch is double-buffered by epoch parity: a peer
// writes epoch e + 2 into our parity-(e & 1) slots only after it received our epoch e + 1
// header (every call exchanges a header with every peer), which we send only after our kernel
// of epoch e, the last reader of those slots, has finished (stream order).
//
// Scratch of one rank: [parity 2][source WORLD][slots] packets; slots 0 and 1 of each region
// hold the call header (the call tag, so ranks making different calls stop with a mismatch,
// sent as one vector like any other, by block 0 to every block), slots 2 + 2i and 3 + 2i hold
// vector i. The layout depends only on the slot count, never on the message size or the grid.
struct LLWire {
    struct Raw {
        u64 w[4];
    };
    // Byte offsets inside a source region: the header block `b` reads, and vector i.
    static __device__ __forceinline__ u64 header_at(u32) { return 0; }
    static __device__ __forceinline__ u64 vec_at(u64 i) { return (1 + i) * 32; }
    // Whether block `b` sends the header (flags make one header readable by every block).
    static __device__ __forceinline__ bool sends_header(u32 b) { return b == 0; }
    static __device__ __forceinline__ void load(const char* addr, Raw* r) {
        tpcomm_ld_volatile_2x64(addr, &r->w[0]);
        tpcomm_ld_volatile_2x64(addr + 16, &r->w[2]);
    }
    static __device__ __forceinline__ bool ready(const Raw& r, u32 flag) {
        return (u32)(r.w[0] >> 32) == flag && (u32)(r.w[1] >> 32) == flag && (u32)(r.w[2] >> 32) == flag &&
               (u32)(r.w[3] >> 32) == flag;
    }
    static __device__ __forceinline__ Vec16 data(const Raw& r) {
        Vec16 v = {{(u32)r.w[0], (u32)r.w[1], (u32)r.w[2], (u32)r.w[3]}};
        return v;
    }
    // Nothing to re-arm: the next call's epoch tells its packets apart.
    static __device__ __forceinline__ void consumed(char*) {}
    static __device__ __forceinline__ void store(char* addr, const Vec16& v, u32 flag) {
        const u64 f = (u64)flag << 32;
        tpcomm_st_volatile_2x64(addr, f | v.w[0], f | v.w[1]);
        tpcomm_st_volatile_2x64(addr + 16, f | v.w[2], f | v.w[3]);
    }
};

// Lamport push.
//
// Receive buffers of one rank: [generation 2][source WORLD][slots] vectors, every 32-bit word
// the sentinel 0xffffffff until a peer's data lands (a 32-bit access is single-copy atomic, so
// a word is either the sentinel or the data). A data word equal to the sentinel (a NaN) is sent
// as 0xfffffffe (still a NaN; an fp32 sum with a NaN is the canonical NaN either way). Slots
// 0..TPCOMM_PACKET_MAX_BLOCKS-1 of each region are the call headers, one per block (the tag,
// never the sentinel: every block sends and reads its own, because each is read once), vector i
// is slot TPCOMM_PACKET_MAX_BLOCKS + i. The thread that reads a slot writes the sentinel back at
// once (`consumed`), so every call leaves its generation re-armed. Calls alternate between the
// two generations: a peer writes generation g again two calls later, only after it received our
// data of the call in between, which we send after the call that read and re-armed g has
// finished (stream order; a kernel's end orders its stores before the next one's).
struct LamportWire {
    typedef Vec16 Raw;
    static __device__ __forceinline__ u64 header_at(u32 b) { return (u64)b * 16; }
    static __device__ __forceinline__ u64 vec_at(u64 i) { return (TPCOMM_PACKET_MAX_BLOCKS + i) * 16; }
    static __device__ __forceinline__ bool sends_header(u32) { return true; }
    static __device__ __forceinline__ void load(const char* addr, Raw* v) {
        tpcomm_ld_volatile_16(addr, v->w);
    }
    static __device__ __forceinline__ bool ready(const Raw& v, u32) {
        return v.w[0] != 0xffffffffu && v.w[1] != 0xffffffffu && v.w[2] != 0xffffffffu && v.w[3] != 0xffffffffu;
    }
    static __device__ __forceinline__ Vec16 data(const Raw& v) { return v; }
    static __device__ __forceinline__ void store_raw(char* addr, const Vec16& v) {
        tpcomm_st_volatile_16(addr, v.w);
    }
    // Re-arm a slot this thread has read (only its reader touches it until a peer writes it
    // again, two calls later).
    static __device__ __forceinline__ void consumed(char* addr) {
        const Vec16 s = {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}};
        store_raw(addr, s);
    }
    static __device__ __forceinline__ void store(char* addr, Vec16 v, u32) {
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (v.w[k] == 0xffffffffu) v.w[k] = 0xfffffffeu;
        store_raw(addr, v);
    }
};

// ---------------------------------------------------------------------------------------------
// Block layout: every block has `data threads` (a multiple of 32, chosen by the host to spread
// small messages over several SMs) followed by one header warp. The header warp sends our call
// header to every peer (LL: block 0's, read by every block; Lamport: each block its own); the
// header warp of every block checks the header of every peer, so a mismatch stops every block
// at once, while the data threads never wait for headers on their critical path.

__device__ __forceinline__ u32 data_threads() {
    return blockDim.x - 32;
}

// Where one call's traffic lives (the generation or parity is already chosen).
struct Call {
    u32 flag;         // LL: the epoch; Lamport: unused
    u64 region;       // bytes per source region
    u64 send_off;     // offset of our region inside any peer's buffer
    const char* own;  // our buffer, this call's generation: region of source r at own + r * region
};

__device__ __forceinline__ Call make_call(const Ptrs& bufs, int rank, u64 slots, u32 gen, u32 flag) {
    Call c;
    c.flag = flag;
    c.region = slots * 16;
    const u64 gen_base = (u64)gen * TPCOMM_WORLD * c.region;
    c.send_off = gen_base + (u64)rank * c.region;
    c.own = (const char*)pick(bufs, rank) + gen_base;
    return c;
}

// The header warp: send (block 0) and check the call headers. It waits only for its own
// timeout (not for `failed`), so a peer that never started is named even when a data thread
// timed out first on a rank that waits for that peer.
template <typename Wire>
__device__ __forceinline__ void headers(const Call& c, const Ptrs& bufs, int rank, u32 tag, u64 timeout_ns, u64* err,
                                        const Fault& fault, volatile int* failed) {
    const int q = threadIdx.x - data_threads();
    if (q >= TPCOMM_WORLD || q == rank) return;
    const Vec16 h = {{tag, tag, tag, tag}};
    const u64 at = Wire::header_at(blockIdx.x);
    if (Wire::sends_header(blockIdx.x)) Wire::store((char*)pick(bufs, q) + c.send_off + at, h, c.flag);
    const char* src = c.own + (u64)q * c.region + at;
    typename Wire::Raw raw;
    Wire::load(src, &raw);
    Spin spin;
    while (!Wire::ready(raw, c.flag)) {
        if (const u64 kind = spin.check(timeout_ns, fault)) {
            fail(err, failed, fault, kind, TPCOMM_WAIT_HEADER, q);
            return;
        }
        Wire::load(src, &raw);
    }
    Wire::consumed((char*)src);
    if (Wire::data(raw).w[0] != tag) fail(err, failed, fault, TPCOMM_ERR_MISMATCH, TPCOMM_WAIT_HEADER, q);
}

// Wait for slot offset `at` of every peer and sum all n contributions in rank order, `mine`
// being ours. Every sweep loads from all pending peers before looking at any value. Gives up
// at the timeout (naming the first missing peer) or when another thread of the block failed.
// The first arrival of all n lets the stream's next kernel be scheduled (common.cuh): this is
// where a packet kernel first knows that every peer's kernel of the call is resident.
template <typename T, typename Wire>
__device__ __forceinline__ bool sum_arrivals(const Call& c, u64 at, const Vec16 mine, int rank, u64 timeout_ns, u64* err,
                                             const Fault& fault, volatile int* failed, Vec16* result) {
    // got[rank] is never written: `mine` is selected in its place with compile-time indices (a
    // store to got[rank] would index at run time and move the whole array to local memory).
    Vec16 got[TPCOMM_WORLD] = {};
    u32 pending = ((1u << TPCOMM_WORLD) - 1) & ~(1u << rank);
    Spin spin;
    while (pending) {
        typename Wire::Raw raw[TPCOMM_WORLD];
#pragma unroll
        for (int r = 0; r < TPCOMM_WORLD; r++)
            if ((pending >> r) & 1) Wire::load(c.own + (u64)r * c.region + at, &raw[r]);
#pragma unroll
        for (int r = 0; r < TPCOMM_WORLD; r++)
            if (((pending >> r) & 1) && Wire::ready(raw[r], c.flag)) {
                got[r] = Wire::data(raw[r]);
                pending &= ~(1u << r);
                Wire::consumed((char*)c.own + (u64)r * c.region + at);
            }
        if (pending) {
            if (*failed) return false;
            if (const u64 kind = spin.check(timeout_ns, fault)) {
                fail(err, failed, fault, kind, TPCOMM_WAIT_DATA, __ffs(pending) - 1);
                return false;
            }
        }
    }
    // Every peer's same block sent this vector, so every peer's kernel of this call is resident.
    pdl_release_next();
    float acc[T::PER_VEC];
    // Selected into a copy: a reference to `rank == r ? mine : got[r]` would take the array's
    // address, which puts it in local memory as surely as a run-time index.
    const Vec16 first = rank == 0 ? mine : got[0];
    unpack<T>(first, acc);
#pragma unroll
    for (int r = 1; r < TPCOMM_WORLD; r++) {
        const Vec16 v = rank == r ? mine : got[r];
        unpack_add<T>(v, acc);
    }
    *result = pack<T>(acc);
    return true;
}

// All-pairs (LL or Lamport): push every vector to every peer, then sum what arrived (vector i
// at Wire::vec_at(i) of each source region). In place is safe: the thread that reads in[i] is
// the one that writes out[i], after reading it.
template <typename T, typename Wire>
__device__ __forceinline__ void allpairs(const char* in, char* out, const Call& c, const Ptrs& bufs, int rank,
                                         u64 count, u64 timeout_ns, u64* err, const Fault& fault,
                                         volatile int* failed) {
    const u64 nvec = (count + T::PER_VEC - 1) / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * data_threads() + threadIdx.x;
    const u64 stride = (u64)gridDim.x * data_threads();
    // Push first: no thread waits before all of its vectors are on their way.
    for (u64 i = tid; i < nvec; i += stride) {
        const Vec16 v = load_vec<T>(in, i, count);
        const u64 at = Wire::vec_at(i);
#pragma unroll
        for (int q = 0; q < TPCOMM_WORLD; q++)
            if (q != rank) Wire::store((char*)bufs.p[q] + c.send_off + at, v, c.flag);
    }
    for (u64 i = tid; i < nvec; i += stride) {
        Vec16 sum;
        if (!sum_arrivals<T, Wire>(c, Wire::vec_at(i), load_vec<T>(in, i, count), rank, timeout_ns, err, fault, failed,
                                   &sum))
            break;
        store_vec<T>(out, i, count, sum);
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// Owner of vector i: the rank whose two-shot shard holds it (first nvec % WORLD shards one longer).
__device__ __forceinline__ int owner_of(u64 i, u64 nvec) {
    const u64 base = nvec / TPCOMM_WORLD, rem = nvec % TPCOMM_WORLD;
    const u64 split = rem * (base + 1);
    return i < split ? (int)(i / (base + 1)) : (int)(rem + (i - split) / base);
}

// LL two-phase: vector i goes to its owner as packets; the owner sums the n contributions in
// rank order and pushes the result to every peer as packets, into the region named after
// itself. Phase-1 packets for vector i land in the owner's scratch only, phase-2 packets in the
// other ranks' scratch only, so the two phases never share a slot although they share the
// epoch. Each thread handles the same i in every phase, so in place is safe.
template <typename T>
__device__ __forceinline__ void twophase(const char* in, char* out, const Call& c, const Ptrs& scratch, int rank,
                                         u64 count, u64 timeout_ns, u64* err, const Fault& fault, volatile int* failed) {
    const u64 nvec = (count + T::PER_VEC - 1) / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * data_threads() + threadIdx.x;
    const u64 stride = (u64)gridDim.x * data_threads();
    // 1. Scatter: every vector we do not own goes to its owner.
    for (u64 i = tid; i < nvec; i += stride) {
        const int o = owner_of(i, nvec);
        if (o != rank) LLWire::store((char*)pick(scratch, o) + c.send_off + LLWire::vec_at(i), load_vec<T>(in, i, count), c.flag);
    }
    // 2. Reduce our shard and broadcast it. Waits only on phase 1, which never waits.
    for (u64 i = tid; i < nvec; i += stride) {
        if (owner_of(i, nvec) != rank) continue;
        const u64 at = LLWire::vec_at(i);
        Vec16 sum;
        if (!sum_arrivals<T, LLWire>(c, at, load_vec<T>(in, i, count), rank, timeout_ns, err, fault, failed, &sum))
            return;
        store_vec<T>(out, i, count, sum);
#pragma unroll
        for (int q = 0; q < TPCOMM_WORLD; q++)
            if (q != rank) LLWire::store((char*)scratch.p[q] + c.send_off + at, sum, c.flag);
    }
    // 3. Gather every other shard from its owner. Waits only on phase 2.
    for (u64 i = tid; i < nvec; i += stride) {
        const int o = owner_of(i, nvec);
        if (o == rank) continue;
        const char* src = c.own + (u64)o * c.region + LLWire::vec_at(i);
        LLWire::Raw raw;
        LLWire::load(src, &raw);
        Spin spin;
        while (!LLWire::ready(raw, c.flag)) {
            if (*failed) return;
            if (const u64 kind = spin.check(timeout_ns, fault)) {
                fail(err, failed, fault, kind, TPCOMM_WAIT_RESULT, o);
                return;
            }
            LLWire::load(src, &raw);
        }
        // The owner's block sent this only after its block received from every rank's.
        pdl_release_next();
        store_vec<T>(out, i, count, LLWire::data(raw));
    }
}

// The LL kernels: all-pairs (every rank pushes its whole input to every peer) or two-phase.
template <typename T, bool TWO_PHASE>
__device__ void ll(const char* in, char* out, const Ptrs& scratch, PacketState* st, int rank, u64 count, u64 slots,
                   u64 timeout_ns, u64* err, u32 tag, const Fault& fault) {
    __shared__ volatile int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    const u32 e = next_epoch(st->ll_epoch[blockIdx.x]);
    const Call c = make_call(scratch, rank, slots, e & 1, e);
    if (threadIdx.x >= data_threads())
        headers<LLWire>(c, scratch, rank, tag, timeout_ns, err, fault, &failed);
    else if (TWO_PHASE)
        twophase<T>(in, out, c, scratch, rank, count, timeout_ns, err, fault, &failed);
    else
        allpairs<T, LLWire>(in, out, c, scratch, rank, count, timeout_ns, err, fault, &failed);
    finish_block(st->ll_epoch, e);
}

// Lamport push: all-pairs with raw data; every slot is re-armed by the thread that read it, so
// the call leaves its generation ready for the call after next.
template <typename T>
__device__ void lamport(const char* in, char* out, const Ptrs& bufs, PacketState* st, int rank, u64 count, u64 slots,
                        u64 timeout_ns, u64* err, u32 tag, const Fault& fault) {
    __shared__ volatile int failed;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    const u32 gen = st->lamport_gen[blockIdx.x] ^ 1;
    const Call c = make_call(bufs, rank, slots, gen, 0);
    if (threadIdx.x >= data_threads())
        headers<LamportWire>(c, bufs, rank, tag, timeout_ns, err, fault, &failed);
    else
        allpairs<T, LamportWire>(in, out, c, bufs, rank, count, timeout_ns, err, fault, &failed);
    finish_block(st->lamport_gen, gen);
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per (algorithm, dtype), all with one signature:
// (input, output, every rank's buffers, our state, rank, count, slots per source region,
//  timeout_ns, error word, call tag, fault word, the value to raise it with). Blocks are data
// threads plus one header warp.

#define TPCOMM_PACKET_ENTRY(NAME, ...)                                                                          \
    extern "C" __global__ void __launch_bounds__(TPCOMM_PACKET_THREADS + 32)                                    \
        NAME(const char* in, char* out, Ptrs scratch, PacketState* st, int rank, u64 count, u64 slots,          \
             u64 timeout_ns, u64* err, u32 tag, u64* fault_word, u64 fault_raise) {                             \
        pdl_wait();                                                                                             \
        const Fault fault = {fault_word, fault_raise};                                                          \
        __VA_ARGS__(in, out, scratch, st, rank, count, slots, timeout_ns, err, tag, fault);                     \
    }

TPCOMM_PACKET_ENTRY(packet_f32, ll<F32, false>)
TPCOMM_PACKET_ENTRY(packet_f16, ll<F16, false>)
TPCOMM_PACKET_ENTRY(packet_bf16, ll<BF16, false>)
TPCOMM_PACKET_ENTRY(packet2_f32, ll<F32, true>)
TPCOMM_PACKET_ENTRY(packet2_f16, ll<F16, true>)
TPCOMM_PACKET_ENTRY(packet2_bf16, ll<BF16, true>)
TPCOMM_PACKET_ENTRY(lamport_f32, lamport<F32>)
TPCOMM_PACKET_ENTRY(lamport_f16, lamport<F16>)
TPCOMM_PACKET_ENTRY(lamport_bf16, lamport<BF16>)
