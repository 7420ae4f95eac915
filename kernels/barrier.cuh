// The barrier of the IPC kernels that synchronise whole launches (custom one-/two-shot, quick):
// every block of a launch meets the same block of every peer, through each rank's signal area.
//
// Compiled after common.cuh, before the family's own file (src/runtime/kernels.rs).
// Defines (from src/runtime/protocol.rs):
//   TPCOMM_MAX_BLOCKS   blocks the signal area has counters for
//   TPCOMM_PARITIES     mailbox generations (2)
//   TPCOMM_THREADS      threads per block of every launch

#if !defined(TPCOMM_MAX_BLOCKS) || !defined(TPCOMM_PARITIES) || !defined(TPCOMM_THREADS)
#error "compile through tpcomm's module cache: protocol defines are missing"
#endif
#if TPCOMM_PARITIES != 2
#error "the kernels are written for two mailbox parities"
#endif

// One rank's signal area, shared with every peer through IPC.
// mailbox[parity][block][peer]: the last barrier `peer` announced to us for `block`, as
//   (call tag << 32) | count in one 64-bit word: the tag (a hash of length, dtype and algorithm
//   made by the host) travels with the flag, so checking that every rank makes the same call
//   costs no extra memory traffic or fence.
// counter[block][peer]: how many barriers our `block` has entered with `peer` (private).
// Counters only grow and are never reset, so a graph replay continues the sequence.
struct Signal {
    u64 mailbox[TPCOMM_PARITIES][TPCOMM_MAX_BLOCKS][TPCOMM_MAX_RANKS];
    u32 counter[TPCOMM_MAX_BLOCKS][TPCOMM_MAX_RANKS];
};

// ---------------------------------------------------------------------------------------------
// Barrier between the same block of every rank.
//
// Thread p (< WORLD) of block b bumps its private counter for (b, p) to c, stores c into peer
// p's mailbox[c & 1][b][rank], then spins until its own mailbox[c & 1][b][p] holds c. Every
// rank makes the same calls with the same grid, so both sides count the same c. Two parities
// suffice: a peer cannot reach c + 2 before we announced c + 1, which we do only after seeing c.
//
// PUBLISH = true (two-shot's middle or end barrier) hands data written in this launch to the
// peers: every thread's writes happen before the __syncthreads() that precedes the announcement,
// so they happen before thread p's release store at system scope (release is cumulative over
// what happens before it; no separate sequentially consistent fence is needed, and one cost
// about 2 us per call); the peer's acquire load of that word and its __syncthreads() after hand
// our writes to all of its threads.
// PUBLISH = false (start and end barriers) is a pure rendezvous: what the peers read after the
// start barrier was written before their kernels began (stream order), and the end barrier only
// says that every peer's loads of our input have returned. Relaxed accesses suffice there and
// skip two system-scope fences per barrier.
//
// The announcement carries the call's tag. A peer whose tag differs made another call (other
// length, dtype or algorithm): the thread records (mismatch, barrier, peer, block) in the error
// word and the block leaves the kernel before touching any data (the host returns
// Error::Mismatch). Every rank sees the other's tag, so every rank stops.
//
// The spin is bounded by `timeout_ns` (see Spin in common.cuh). On timeout the thread records
// (barrier, peer, block) into the host-visible error word unless a mismatch is already there,
// raises the group's fault word (so the other ranks' kernels stop waiting for us), and the
// whole block leaves the kernel; the host turns that into Error::PeerTimeout. A wait that finds
// the fault word raised by another rank records TPCOMM_ERR_PEER_FAILED and leaves at once.
template <bool PUBLISH>
__device__ __forceinline__ bool barrier(Signal* self, const Ptrs& sigs, int rank, u32 id, u32 tag, u64 timeout_ns,
                                        volatile u64* err, const Fault& fault, volatile int* failed) {
    __syncthreads();
    if (threadIdx.x < TPCOMM_WORLD) {
        const int p = threadIdx.x;
        const u32 c = self->counter[blockIdx.x][p] + 1;
        self->counter[blockIdx.x][p] = c;
        Signal* peer = (Signal*)pick(sigs, p);
        u64* theirs = &peer->mailbox[c & 1][blockIdx.x][rank];
        const u64* mine = &self->mailbox[c & 1][blockIdx.x][p];
        const u64 word = ((u64)tag << 32) | c;
        if (PUBLISH) {
            st_release_sys(theirs, word);
        } else {
            st_relaxed_sys(theirs, word);
        }
        u64 got;
        Spin spin;
        while ((u32)(got = (PUBLISH ? ld_acquire_sys(mine) : ld_relaxed_sys(mine))) != c) {
            if (const u64 kind = spin.check(timeout_ns, fault)) {
                if (*err == 0) *err = kind | ((u64)id << 32) | ((u64)p << 16) | (u64)blockIdx.x;
                if (kind != TPCOMM_ERR_PEER_FAILED) fault.raise_now();
                __threadfence_system();
                *failed = 1;
                break;
            }
        }
        if ((u32)got == c && (u32)(got >> 32) != tag) {
            *err = TPCOMM_ERR_MISMATCH | ((u64)id << 32) | ((u64)p << 16) | (u64)blockIdx.x;
            fault.raise_now();
            *failed = 1;
        }
    }
    __syncthreads();
    return *failed == 0;
}
