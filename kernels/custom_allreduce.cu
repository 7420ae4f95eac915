// Custom allreduce over CUDA IPC: one-shot and two-shot, f32 / f16 / bf16.
//
// Types and memory helpers come from kernels/common.cuh, the signal area and its barrier from
// kernels/barrier.cuh, the fused epilogue (residual add + RMSNorm) from kernels/rms_norm.cuh, all
// prepended by the module cache.
//
// Compiled at run time with these defines (from src/runtime/protocol.rs, never hard-coded here):
//   TPCOMM_WORLD        ranks of this module (1..=TPCOMM_MAX_RANKS); 1 makes the kernels a copy
//   TPCOMM_MAX_RANKS    row width of the rank-data table and of the signal mailboxes
//   TPCOMM_MAX_BLOCKS   blocks the signal area has counters for
//   TPCOMM_PARITIES     mailbox generations (2)
//   TPCOMM_VEC_BYTES    bytes per vector access (16)
//   TPCOMM_THREADS      threads per block of the fused one-shot + RMSNorm (the norm's lanes)
//   TPCOMM_AR_THREADS   threads per block of the plain one-shot and two-shots
//   TPCOMM_BARRIER_*    barrier ids reported in the error word
//   TPCOMM_ERR_*        error word kinds (common.cuh)
//
// Results: element i is sum(x_r[i] for r = 0..WORLD-1) in that order, in fp32, rounded once,
// the first term taken as is (not 0 + x_0, which would turn -0 into +0). Both algorithms and
// every grid size give the same bits, and the same bits as tpcomm::dtype::reference_sum.

// ---------------------------------------------------------------------------------------------
// The sum of one vector / one element over all ranks, in rank order.

template <typename T>
__device__ __forceinline__ Vec16 sum_vec(const Ptrs& in, u64 i) {
    // Each vector is copied before it is unpacked: unpacked through a reference to memory, it
    // would be read as four 4-byte loads instead of one 16-byte load.
    float acc[T::PER_VEC];
    const Vec16 first = ((const Vec16*)in.p[0])[i];
    unpack<T>(first, acc);
#pragma unroll
    for (int r = 1; r < TPCOMM_WORLD; r++) {
        const Vec16 v = ((const Vec16*)in.p[r])[i];
        unpack_add<T>(v, acc);
    }
    return pack<T>(acc);
}

// The same sum read through references to memory, lane by lane (4-byte loads): fewer registers
// live at once, which the fused kernel needs (it keeps six vectors of its rows in registers; with
// sum_vec it spills at 8 ranks: 156 bytes for f32, 24 for f16).
template <typename T>
__device__ __forceinline__ Vec16 sum_vec_lanes(const Ptrs& in, u64 i) {
    float acc[T::PER_VEC];
    unpack<T>(((const Vec16*)in.p[0])[i], acc);
#pragma unroll
    for (int r = 1; r < TPCOMM_WORLD; r++) unpack_add<T>(((const Vec16*)in.p[r])[i], acc);
    return pack<T>(acc);
}

template <typename T>
__device__ __forceinline__ typename T::Bits sum_elem(const Ptrs& in, u64 j) {
    float acc = T::to_f(((const typename T::Bits*)in.p[0])[j]);
#pragma unroll
    for (int r = 1; r < TPCOMM_WORLD; r++) acc += T::to_f(((const typename T::Bits*)in.p[r])[j]);
    return T::from_f(acc);
}

// ---------------------------------------------------------------------------------------------
// The rank-data row of a call: every rank's input, `in_offset` bytes into the buffers the row
// names. A row must hold this rank's own input at index `rank`: a call captured into a CUDA
// graph outside a registration, or replayed after its registration was dropped, finds a zeroed
// or reused row there. The kernel then records TPCOMM_ERR_BAD_ROW, raises the fault word and
// leaves before it reads any address the row names. The row is loaded before the start barrier
// and checked after it, so the load's latency hides behind the barrier's round trip (the
// barrier itself touches only the signal areas, never an address from the row).
__device__ __forceinline__ void load_row(const Ptrs* __restrict__ rd, u64 in_offset, Ptrs* in) {
    *in = *rd;
#pragma unroll
    for (int r = 0; r < TPCOMM_WORLD; r++) in->p[r] += in_offset;
}

__device__ __forceinline__ bool row_is_mine(const Ptrs& in, const char* local_in, int rank, volatile u64* err,
                                            const Fault& fault) {
    if (pick(in, rank) == (u64)local_in) return true;
    if (threadIdx.x == 0) {
        if (*err == 0) *err = TPCOMM_ERR_BAD_ROW | ((u64)rank << 16) | (u64)blockIdx.x;
        fault.raise_now();
    }
    return false;
}

// The rows of a call that writes every rank's output: every rank's input (`rd`) and output
// (`rd_out`), each checked to name our own buffer at our index before anything is read or
// written through it.
__device__ __forceinline__ bool load_rows(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in,
                                          const Ptrs* __restrict__ rd_out, u64 out_offset, const char* out, int rank,
                                          volatile u64* err, const Fault& fault, Ptrs* in, Ptrs* outs) {
    load_row(rd, in_offset, in);
    load_row(rd_out, out_offset, outs);
    return row_is_mine(*in, local_in, rank, err, fault) && row_is_mine(*outs, out, rank, err, fault);
}

// ---------------------------------------------------------------------------------------------
// One-shot: every rank reads every input and writes its whole output.
//
// rd:      rank-data row: rd->p[r] + in_offset is rank r's input (an address valid here)
// sigs:    every rank's signal area, entry `rank` being our own
// out:     our output (may be our own input only when no peer reads it: the host stages then)
// count:   elements; the last count % PER_VEC are summed element by element
template <typename T>
__device__ void oneshot(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in, const Ptrs& sigs, char* out,
                        int rank, u64 count, u64 timeout_ns, u64* err, u32 tag, const Fault& fault) {
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    Signal* self = (Signal*)pick(sigs, rank);
    Ptrs in;
    load_row(rd, in_offset, &in);
    // Start: every peer's kernel is running, so its input (written by earlier work on its
    // stream) is complete.
    if (!barrier<false>(self, sigs, rank, TPCOMM_BARRIER_START, tag, timeout_ns, err, fault, &failed)) return;
    pdl_release_next();  // every peer's block b is resident (common.cuh)
    if (!row_is_mine(in, local_in, rank, err, fault)) return;
    const u64 nvec = count / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = tid; i < nvec; i += stride) ((Vec16*)out)[i] = sum_vec<T>(in, i);
    const u64 j = nvec * T::PER_VEC + tid;
    if (j < count) ((typename T::Bits*)out)[j] = sum_elem<T>(in, j);
    // End: no rank returns (and lets its caller overwrite its input) while a peer still reads it.
    barrier<false>(self, sigs, rank, TPCOMM_BARRIER_END, tag, timeout_ns, err, fault, &failed);
}

// One-shot fused with residual add + RMSNorm (kernels/rms_norm.cuh): `out` is norm_out, and
// each block owns whole rows (block b: rows b, b + gridDim.x, ...), so the row's sum of squares
// never leaves the block. The sums are one-shot's bits; the epilogue's are the standalone
// kernel's, so fused and split give the same results.
//
// Safe as one-shot is: every rank's block b owns the same rows and reads peers' inputs only
// between its start and end barriers. residual_out is local. norm_out is local too, but in place
// it is our input, which peers read until they enter the end barrier: then (`late`) each block
// keeps its rows' 1 / rms and writes norm_out only after the end barrier (the host stages the
// input instead where a block would own more than TPCOMM_NORM_LATE_ROWS rows). The weight and
// the first row's residual are loaded before the start barrier (local data, complete when the
// kernel starts), so their latency hides behind the barrier's round trip.
template <typename T>
struct RankSum {
    Ptrs in;
    __device__ __forceinline__ Vec16 operator()(u64 i) const { return sum_vec_lanes<T>(in, i); }
};

template <typename T>
__device__ void oneshot_norm(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in, const Ptrs& sigs,
                             char* out, int rank, u64 count, u64 timeout_ns, u64* err, u32 tag, const Fault& fault,
                             const NormArgs& norm) {
    __shared__ int failed;
    __shared__ float inv_rows[TPCOMM_NORM_LATE_ROWS];
    if (threadIdx.x == 0) failed = 0;
    Signal* self = (Signal*)pick(sigs, rank);
    RankSum<T> src;
    load_row(rd, in_offset, &src.in);
    const u64 rows = count / norm.hidden;
    Vec16 w[TPCOMM_NORM_KEEP], res[TPCOMM_NORM_KEEP], keep[TPCOMM_NORM_KEEP];
    load_weight<T>(norm, w);
    if (blockIdx.x < rows) load_residual<T>(norm, blockIdx.x, res);
    if (!barrier<false>(self, sigs, rank, TPCOMM_BARRIER_START, tag, timeout_ns, err, fault, &failed)) return;
    pdl_release_next();  // every peer's block b is resident (common.cuh)
    if (!row_is_mine(src.in, local_in, rank, err, fault)) return;
    int slot = 0;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x, slot++) {
        if (row != blockIdx.x) load_residual<T>(norm, row, res);
        const float inv = add_residual_row<T>(src, row, norm, res, keep);
        if (!norm.late) {
            norm_row<T, true>(row, norm, inv, keep, w, out);
        } else if (threadIdx.x == 0) {
            inv_rows[slot] = inv;
        }
    }
    // End: no rank returns (and lets its caller overwrite its input) while a peer still reads it.
    const bool met = barrier<false>(self, sigs, rank, TPCOMM_BARRIER_END, tag, timeout_ns, err, fault, &failed);
    if (!norm.late || !met) return;
    // Every peer has read our input: norm_out may overwrite it. A block of one row still holds
    // it; otherwise each thread reads back its own residual_out stores.
    if (blockIdx.x + gridDim.x >= rows) {
        if (blockIdx.x < rows) norm_row<T, true>(blockIdx.x, norm, inv_rows[0], keep, w, out);
        return;
    }
    slot = 0;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x, slot++)
        norm_row<T, false>(row, norm, inv_rows[slot], keep, w, out);
}

// Shard r of nvec vectors: [start, end), the first nvec % WORLD shards one vector longer.
__device__ __forceinline__ void shard(u64 nvec, int r, u64* start, u64* end) {
    const u64 base = nvec / TPCOMM_WORLD, rem = nvec % TPCOMM_WORLD;
    *start = (u64)r * base + ((u64)r < rem ? (u64)r : rem);
    *end = *start + base + ((u64)r < rem ? 1 : 0);
}

// Two-shot: reduce-scatter into our scratch, fenced barrier, all-gather from every scratch.
//
// scratch: every rank's scratch area; element k of the message lives at byte k * sizeof(T) of
//          it whatever the message size or grid (the layout never depends on either).
// The tail (count % PER_VEC elements) belongs to the last rank's shard.
//
// In place is safe: inputs are read only before the middle barrier and `out` is written only
// after it. No end barrier is needed: a peer reads our scratch only before it enters its next
// call's start barrier, and we write our scratch again only after passing that barrier; our
// input is last read before the middle barrier.
template <typename T>
__device__ void twoshot(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in, const Ptrs& sigs,
                        const Ptrs& scratch, char* out, int rank, u64 count, u64 timeout_ns, u64* err, u32 tag,
                        const Fault& fault) {
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    Signal* self = (Signal*)pick(sigs, rank);
    Ptrs in;
    load_row(rd, in_offset, &in);
    if (!barrier<false>(self, sigs, rank, TPCOMM_BARRIER_START, tag, timeout_ns, err, fault, &failed)) return;
    pdl_release_next();  // every peer's block b is resident (common.cuh)
    if (!row_is_mine(in, local_in, rank, err, fault)) return;
    const u64 nvec = count / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 s0, s1;
    shard(nvec, rank, &s0, &s1);
    Vec16* mine = (Vec16*)pick(scratch, rank);
    // Two vectors per thread per pass, both loaded before either is stored: more loads in
    // flight where the co-residency cap limits the threads (8 ranks, 1-16 MiB: 1-4% faster; 4
    // ranks unchanged; bench/RESULTS.md "Occupancy and grid of the IPC kernels ...", items 1
    // and 2). One-shot and the direct two-shot measured no gain, so they keep one per pass.
    for (u64 i = s0 + tid; i < s1; i += 2 * stride) {
        const bool second = i + stride < s1;
        const Vec16 a = sum_vec<T>(in, i);
        Vec16 b = a;  // stored only when `second`
        if (second) b = sum_vec<T>(in, i + stride);
        mine[i] = a;
        if (second) mine[i + stride] = b;
    }
    if (rank == TPCOMM_WORLD - 1) {
        const u64 j = nvec * T::PER_VEC + tid;
        if (j < count) ((typename T::Bits*)mine)[j] = sum_elem<T>(in, j);
    }
    // Middle: every shard is reduced and published (release at system scope).
    if (!barrier<true>(self, sigs, rank, TPCOMM_BARRIER_MID, tag, timeout_ns, err, fault, &failed)) return;
    // All-gather: vector i of every shard per pass, WORLD loads in flight before any store (a
    // shard after another kept two in flight: 8 ranks 1 MiB 15.9 -> 13.3 us, 4 ranks 8 MiB 34.3
    // -> 32.4; bench/RESULTS.md "All-gather loads in flight ...", item 1).
    const u64 longest = nvec / TPCOMM_WORLD + (nvec % TPCOMM_WORLD ? 1 : 0);
    for (u64 i = tid; i < longest; i += stride) {
        Vec16 v[TPCOMM_WORLD];
#pragma unroll
        for (int s = 0; s < TPCOMM_WORLD; s++) {
            shard(nvec, s, &s0, &s1);
            if (s0 + i < s1) v[s] = ld_volatile_v4((const char*)scratch.p[s] + (s0 + i) * 16);
        }
#pragma unroll
        for (int s = 0; s < TPCOMM_WORLD; s++) {
            shard(nvec, s, &s0, &s1);
            if (s0 + i < s1) ((Vec16*)out)[s0 + i] = v[s];
        }
    }
    const u64 j = nvec * T::PER_VEC + tid;
    if (j < count)
        ((typename T::Bits*)out)[j] =
            ld_volatile_elem<T>((const char*)scratch.p[TPCOMM_WORLD - 1] + j * sizeof(typename T::Bits));
}

// Two-shot whose all-gather is a store: the owner of each shard reduces it from every input and
// stores the result straight into every rank's output (each output named by `rd_out`, a row of
// the rank-data table like `rd`), so each rank reads its share once and writes it once instead
// of passing it through a scratch buffer that every rank reads again.
//
// Safe in place and out of place, and with some ranks in place and others not: shard s of every
// input and of every output is touched by its owner s alone, and each of its threads reads an
// element before it stores the same element. The start barrier says every rank's earlier work
// on its input and output is done (stream order); the end barrier publishes our stores (system
// fence, release) and waits until every peer's stores into our output are visible. Block b's
// stores reach every peer's block b through that barrier, and a rank's kernel ends only when all
// of its blocks passed it, so the whole output is complete when the kernel is.
//
// Both rows are checked before the start barrier: a rank whose row is stale never announces
// itself, so its peers stop at the start barrier (they see the fault word) and no rank stores
// into memory a stale row names.
template <typename T>
__device__ void twoshot_direct(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in,
                               const Ptrs* __restrict__ rd_out, u64 out_offset, const Ptrs& sigs, char* out, int rank,
                               u64 count, u64 timeout_ns, u64* err, u32 tag, const Fault& fault) {
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    Signal* self = (Signal*)pick(sigs, rank);
    Ptrs in, outs;
    if (!load_rows(rd, in_offset, local_in, rd_out, out_offset, out, rank, err, fault, &in, &outs)) return;
    if (!barrier<false>(self, sigs, rank, TPCOMM_BARRIER_START, tag, timeout_ns, err, fault, &failed)) return;
    pdl_release_next();  // every peer's block b is resident (common.cuh)
    const u64 nvec = count / T::PER_VEC;
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 s0, s1;
    shard(nvec, rank, &s0, &s1);
    for (u64 i = s0 + tid; i < s1; i += stride) {
        const Vec16 v = sum_vec<T>(in, i);
#pragma unroll
        for (int r = 0; r < TPCOMM_WORLD; r++) ((Vec16*)outs.p[r])[i] = v;
    }
    if (rank == TPCOMM_WORLD - 1) {
        const u64 j = nvec * T::PER_VEC + tid;
        if (j < count) {
            const typename T::Bits v = sum_elem<T>(in, j);
#pragma unroll
            for (int r = 0; r < TPCOMM_WORLD; r++) ((typename T::Bits*)outs.p[r])[j] = v;
        }
    }
    barrier<true>(self, sigs, rank, TPCOMM_BARRIER_END, tag, timeout_ns, err, fault, &failed);
}

// The allreduce's sum of the rows of this call, read back from our norm_out, where every rank
// stored its pieces (volatile: peers wrote it during this launch).
struct StoredSum {
    const char* p;
    __device__ __forceinline__ Vec16 operator()(u64 i) const { return ld_volatile_v4(p + i * 16); }
};

// Two-shot fused with residual add + RMSNorm: `out` is norm_out, named on every rank by `rd_out`.
// Block b owns rows b, b + gridDim.x, ... on every rank; each row is cut into WORLD pieces (shard
// of the row's vectors), and piece s is reduced by rank s, which stores the sum (all_reduce's
// bits) into every rank's norm_out (the direct two-shot's store as all-gather). After the end
// barrier every rank's block b holds the sums of its own rows in its norm_out and finishes them
// locally: residual_out = sum + residual, then norm_out over the sum, both by the standalone
// kernel's code (rms_norm.cuh), so fused and split give the same bits.
//
// Safe as the direct two-shot is: piece s of a row, in every input and every norm_out, is
// touched before the end barrier by rank s's block b alone, and each thread reads an element of
// every input before it stores that element (so norm_out may be the input). The start barrier
// says every rank's earlier work on its buffers is done; the end barrier (publishing, per block)
// makes every peer's stores into our rows visible to our block b, which alone reads those rows,
// and after it no peer touches our buffers in this call. residual and residual_out are local.
template <typename T>
__device__ void twoshot_norm(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in,
                             const Ptrs* __restrict__ rd_out, u64 out_offset, const Ptrs& sigs, char* out, int rank,
                             u64 count, u64 timeout_ns, u64* err, u32 tag, const Fault& fault, const NormArgs& norm) {
    __shared__ int failed;
    if (threadIdx.x == 0) failed = 0;
    Signal* self = (Signal*)pick(sigs, rank);
    Ptrs in, outs;
    if (!load_rows(rd, in_offset, local_in, rd_out, out_offset, out, rank, err, fault, &in, &outs)) return;
    const u64 rows = count / norm.hidden;
    const u64 per_row = norm.hidden / T::PER_VEC;
    u64 p0, p1;
    shard(per_row, rank, &p0, &p1);
    const u64 piece = p1 - p0;
    // Local data, complete when the kernel starts: loaded before the barrier's round trip.
    Vec16 w[TPCOMM_NORM_KEEP], res[TPCOMM_NORM_KEEP], keep[TPCOMM_NORM_KEEP];
    load_weight<T>(norm, w);
    if (blockIdx.x < rows) load_residual<T>(norm, blockIdx.x, res);
    if (!barrier<false>(self, sigs, rank, TPCOMM_BARRIER_START, tag, timeout_ns, err, fault, &failed)) return;
    pdl_release_next();  // every peer's block b is resident (common.cuh)
    // Our piece of each of the block's rows, all pieces spread over the block's threads.
    const u64 my_rows = blockIdx.x < rows ? (rows - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    for (u64 j = threadIdx.x; j < my_rows * piece; j += blockDim.x) {
        const u64 row = blockIdx.x + (j / piece) * gridDim.x;
        const u64 i = row * per_row + p0 + j % piece;
        const Vec16 v = sum_vec<T>(in, i);
#pragma unroll
        for (int r = 0; r < TPCOMM_WORLD; r++) ((Vec16*)outs.p[r])[i] = v;
    }
    if (!barrier<true>(self, sigs, rank, TPCOMM_BARRIER_END, tag, timeout_ns, err, fault, &failed)) return;
    // Every piece of our rows is in our norm_out: finish them here.
    const StoredSum sums = {out};
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        if (row != blockIdx.x) load_residual<T>(norm, row, res);
        const float inv = add_residual_row<T>(sums, row, norm, res, keep);
        norm_row<T, true>(row, norm, inv, keep, w, out);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points, one per (algorithm, dtype), all with one signature:
// (rank-data row, input offset into the row's buffers, our own input, the outputs' row and the
//  output offset into its buffers (two-shot direct only), signals, scratch, out, rank, count,
//  timeout_ns, error word, call tag, fault word, the value to raise it with, then the epilogue's
//  residual, residual_out, weight, hidden, eps and late flag (one-shot fused with the norm only;
//  zero otherwise))

// BLOCKS_PER_SM sets each entry's register budget (65536 / (THREADS x BLOCKS_PER_SM)): 1024 threads
// per SM, 64 registers a thread, for every kernel but the direct two-shot, which takes 512 per SM
// (128 registers): at 8 ranks it holds 8 loaded vectors and 16 row pointers at once, and at 64 it
// reloaded the pointers from local memory in its loop (8 ranks 2-8 MiB in place 5-7% slower
// under MPS; bench/RESULTS.md "Register budget of the direct two-shot"). The fused two-shot keeps
// both rows of pointers and the weight, residual and residual_out vectors of its rows at once:
// one block of TPCOMM_THREADS per SM (128 registers) up to 6 ranks, where two would spill; two at
// 7 and 8 (64 registers suffice there in bf16 and f16), where the shared device's cap would
// otherwise leave 16-18 blocks for all rows. The host computes
// the shared device's grid cap from the driver's occupancy of the kernels of each budget.
#define TPCOMM_ENTRY(NAME, THREADS, BLOCKS_PER_SM, ALGO)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, BLOCKS_PER_SM)                                  \
        NAME(const Ptrs* __restrict__ rd, u64 in_offset, const char* local_in, const Ptrs* __restrict__ rd_out, \
             u64 out_offset, Ptrs sigs, Ptrs scratch, char* out, int rank, u64 count, u64 timeout_ns, u64* err,  \
             u32 tag, u64* fault_word, u64 fault_raise, const char* residual, char* residual_out,                \
             const char* weight, u64 hidden, float eps, int late) {                                       \
        pdl_wait();                                                                                       \
        const Fault fault = {fault_word, fault_raise};                                                    \
        const NormArgs norm = {residual, residual_out, weight, hidden, eps, late};                        \
        (void)norm;                                                                                       \
        ALGO;                                                                                             \
    }

#define TPCOMM_ONESHOT(T) oneshot<T>(rd, in_offset, local_in, sigs, out, rank, count, timeout_ns, err, tag, fault)
#define TPCOMM_ONESHOT_NORM(T) \
    oneshot_norm<T>(rd, in_offset, local_in, sigs, out, rank, count, timeout_ns, err, tag, fault, norm)
#define TPCOMM_TWOSHOT(T) \
    twoshot<T>(rd, in_offset, local_in, sigs, scratch, out, rank, count, timeout_ns, err, tag, fault)

#define TPCOMM_TWOSHOT_NORM(T)                                                                            \
    twoshot_norm<T>(rd, in_offset, local_in, rd_out, out_offset, sigs, out, rank, count, timeout_ns, err, tag, fault, \
                    norm)
#define TPCOMM_DIRECT(T)                                                                                  \
    twoshot_direct<T>(rd, in_offset, local_in, rd_out, out_offset, sigs, out, rank, count, timeout_ns, err, tag, \
                      fault)

TPCOMM_ENTRY(oneshot_f32, TPCOMM_AR_THREADS, 1024 / TPCOMM_AR_THREADS, TPCOMM_ONESHOT(F32))
TPCOMM_ENTRY(oneshot_f16, TPCOMM_AR_THREADS, 1024 / TPCOMM_AR_THREADS, TPCOMM_ONESHOT(F16))
TPCOMM_ENTRY(oneshot_bf16, TPCOMM_AR_THREADS, 1024 / TPCOMM_AR_THREADS, TPCOMM_ONESHOT(BF16))
TPCOMM_ENTRY(oneshot_norm_f32, TPCOMM_THREADS, 1024 / TPCOMM_THREADS, TPCOMM_ONESHOT_NORM(F32))
TPCOMM_ENTRY(oneshot_norm_f16, TPCOMM_THREADS, 1024 / TPCOMM_THREADS, TPCOMM_ONESHOT_NORM(F16))
TPCOMM_ENTRY(oneshot_norm_bf16, TPCOMM_THREADS, 1024 / TPCOMM_THREADS, TPCOMM_ONESHOT_NORM(BF16))
TPCOMM_ENTRY(twoshot_f32, TPCOMM_AR_THREADS, 1024 / TPCOMM_AR_THREADS, TPCOMM_TWOSHOT(F32))
TPCOMM_ENTRY(twoshot_f16, TPCOMM_AR_THREADS, 1024 / TPCOMM_AR_THREADS, TPCOMM_TWOSHOT(F16))
TPCOMM_ENTRY(twoshot_bf16, TPCOMM_AR_THREADS, 1024 / TPCOMM_AR_THREADS, TPCOMM_TWOSHOT(BF16))
TPCOMM_ENTRY(twoshot_direct_f32, TPCOMM_AR_THREADS, 512 / TPCOMM_AR_THREADS, TPCOMM_DIRECT(F32))
TPCOMM_ENTRY(twoshot_direct_f16, TPCOMM_AR_THREADS, 512 / TPCOMM_AR_THREADS, TPCOMM_DIRECT(F16))
TPCOMM_ENTRY(twoshot_direct_bf16, TPCOMM_AR_THREADS, 512 / TPCOMM_AR_THREADS, TPCOMM_DIRECT(BF16))
#define TPCOMM_TWOSHOT_NORM_PER_SM (TPCOMM_WORLD >= 7 ? 2 : 1)
TPCOMM_ENTRY(twoshot_norm_f32, TPCOMM_THREADS, TPCOMM_TWOSHOT_NORM_PER_SM, TPCOMM_TWOSHOT_NORM(F32))
TPCOMM_ENTRY(twoshot_norm_f16, TPCOMM_THREADS, TPCOMM_TWOSHOT_NORM_PER_SM, TPCOMM_TWOSHOT_NORM(F16))
TPCOMM_ENTRY(twoshot_norm_bf16, TPCOMM_THREADS, TPCOMM_TWOSHOT_NORM_PER_SM, TPCOMM_TWOSHOT_NORM(BF16))
