//! Protocol constants of the CUDA kernels: the one place they are defined.
//!
//! `kernels/custom_allreduce.cu` receives the values below as NVRTC `-D` defines (see
//! [`defines`]), `kernels/packet_allreduce.cu` those of [`packet_defines`],
//! `kernels/quick_allreduce.cu` those of [`quick_defines`], so host and device
//! cannot drift (neither kernel file spells an error bit or a layout width itself). The layouts described here are the ones the kernels' `struct Signal`,
//! `struct PacketState` and `struct Ptrs` have.
//!
//! This file names nothing else of the crate: the build script compiles it too (`build.rs`,
//! for the HIP code objects of the `rocm` feature), so both use the same defines.

/// Elements per quick (quantized) group, one scale each ([`crate::quant::GROUP`]).
pub const QUICK_GROUP: usize = 32;
/// Most ranks one custom allreduce spans (one per GPU of an NVLink domain).
pub const MAX_RANKS: usize = 8;
/// Most thread blocks of one launch; the signal area holds counters for this many.
pub const MAX_BLOCKS: usize = 128;
/// Threads per block of the norm kernels, the fused one-shot + RMSNorm (its threads are the lanes
/// of a row's sum of squares, so it must match the standalone norm kernel) and quick.
pub const THREADS: usize = 512;
/// Threads per block of the plain custom allreduce kernels (one-shot and both two-shots).
/// Measured on one H200 under MPS against 512 with the same threads per launch (twice the
/// blocks; bench/RESULTS.md "Blocks of 256 threads"): 4 ranks 2 MiB in place 9.3 -> 8.5 us,
/// 8 ranks 256 KiB 8.9 -> 7.9; out of place 2-4% lost at 4 ranks 8-16 MiB (the scratch
/// two-shot's large grid) and 8 ranks 128 KiB.
pub const AR_THREADS: usize = 256;
/// Rows of the fused one-shot + RMSNorm one block can keep the norms of until its end barrier
/// (so in place it needs no staging copy).
pub const NORM_LATE_ROWS: usize = 16;
/// Bytes one thread moves per load or store (one `uint4`).
pub const VEC_BYTES: usize = 16;
/// Required alignment of every buffer pointer the kernels read or write.
pub const ALIGN: usize = VEC_BYTES;
/// Mailbox generations: a fast peer may signal barrier `k + 1` while we still wait on `k`.
pub const PARITIES: usize = 2;

/// `u64` mailboxes per rank: `[PARITIES][MAX_BLOCKS][MAX_RANKS]`, written by peers; each holds
/// `(call tag << 32) | barrier count`.
pub const MAILBOX_WORDS: usize = PARITIES * MAX_BLOCKS * MAX_RANKS;
/// `u32` counters per rank: `[MAX_BLOCKS][MAX_RANKS]`, private to the owning rank.
pub const COUNTER_WORDS: usize = MAX_BLOCKS * MAX_RANKS;
/// Bytes of one rank's signal area (mailboxes then counters), rounded up to 256.
pub const SIGNAL_BYTES: usize = (MAILBOX_WORDS * 8 + COUNTER_WORDS * 4).div_ceil(256) * 256;
/// Bytes of one rank-data row: `MAX_RANKS` device addresses (`u64`).
pub const RANK_DATA_ROW_BYTES: usize = MAX_RANKS * 8;

/// Barrier ids recorded in the error word, so a timeout says where it happened.
pub const BARRIER_START: u32 = 0;
/// The fenced barrier between reduce-scatter and all-gather of two-shot.
pub const BARRIER_MID: u32 = 1;
/// The barrier at the end of one-shot (inputs may be reused after it).
pub const BARRIER_END: u32 = 2;
/// Quick allreduce: the fenced barrier after the owners pushed their re-encoded shards.
pub const BARRIER_GATHER: u32 = 6;
/// Quick allreduce: most thread blocks of one launch (its signal area has counters for this
/// many). The codecs spend arithmetic per element, so quick fills the GPU with more blocks
/// than the custom kernels' copies need.
pub const QUICK_MAX_BLOCKS: usize = 128;

/// Bytes of a signal area with counters for `max_blocks` blocks (mailboxes then counters),
/// rounded up to 256.
pub const fn signal_bytes(max_blocks: usize) -> usize {
    (PARITIES * max_blocks * MAX_RANKS * 8 + max_blocks * MAX_RANKS * 4).div_ceil(256) * 256
}

/// Bit set in the error word when a barrier timed out; see [`decode_error`].
pub const ERR_TIMEOUT: u64 = 1 << 63;
/// Bit set in the error word when a peer announced another call tag (length, dtype or
/// algorithm); see [`decode_error`].
pub const ERR_MISMATCH: u64 = 1 << 62;
/// Bit set in the error word when the group's fault word was raised while the kernel waited
/// (another rank failed or aborted): the kernel left without waiting out its timeout.
pub const ERR_PEER_FAILED: u64 = 1 << 61;
/// Bit set in the error word when a custom kernel's rank-data row does not hold its own input
/// (a call captured into a CUDA graph outside a registration, or a row freed since): the kernel
/// left before touching any memory a row names.
pub const ERR_BAD_ROW: u64 = 1 << 60;
/// Waits poll the group's fault word (mapped host memory, a slow read) once per this many polls.
pub const FAULT_POLLS: u32 = 1024;

/// Packet kernels: most blocks of one launch (the per-block counters exist for this many).
pub const PACKET_MAX_BLOCKS: usize = 64;
/// Packet kernels: most data threads per block (one 16-byte vector per thread per step); every
/// block also has one warp that sends and checks the call headers.
pub const PACKET_THREADS: usize = 256;
/// Packet kernels: the header warp every block has besides its data threads.
pub const PACKET_HEADER_THREADS: usize = 32;
/// Lamport receive-buffer generations: the current call's and the one a fast peer may already
/// fill for the next call (each call re-arms the slots it reads as it reads them).
pub const LAMPORT_GENS: usize = 2;
/// Bytes of one rank's private packet state: LL epochs and Lamport generations per block
/// (`u32` each).
pub const PACKET_STATE_BYTES: usize = 2 * PACKET_MAX_BLOCKS * 4;
/// Packet wait ids recorded in the error word: the call header of a peer.
pub const WAIT_HEADER: u32 = 3;
/// A peer's data packets (all-pairs, Lamport, two-phase reduce).
pub const WAIT_DATA: u32 = 4;
/// An owner's reduced shard (two-phase gather).
pub const WAIT_RESULT: u32 = 5;

/// LL packet slots per source region for messages up to `max_bytes`: two 16-byte packets per
/// 16-byte vector, the header (one vector) first.
pub const fn ll_slots(max_bytes: usize) -> usize {
    2 * (1 + max_bytes.div_ceil(VEC_BYTES))
}

/// Bytes of one rank's LL scratch: `[parity 2][source world][ll_slots]` packets of 16 bytes.
pub const fn ll_scratch_bytes(world: usize, max_bytes: usize) -> usize {
    2 * world * ll_slots(max_bytes) * 16
}

/// Lamport slots per source region: a header per block (each block reads its own), then one per
/// 16-byte vector.
pub const fn lamport_slots(max_bytes: usize) -> usize {
    PACKET_MAX_BLOCKS + max_bytes.div_ceil(VEC_BYTES)
}

/// Bytes of one rank's Lamport receive buffers: `[generation 2][source world][lamport_slots]`.
pub const fn lamport_bytes(world: usize, max_bytes: usize) -> usize {
    LAMPORT_GENS * world * lamport_slots(max_bytes) * 16
}

const _: () = assert!(PACKET_THREADS >= MAX_RANKS && PACKET_THREADS % 32 == 0);
const _: () = assert!(PACKET_MAX_BLOCKS <= 0xffff);
const _: () = assert!(MAX_RANKS <= 32, "a warp signals all peers at once");
const _: () = assert!(THREADS >= MAX_RANKS && THREADS % 32 == 0);
const _: () = assert!(AR_THREADS >= MAX_RANKS && AR_THREADS % 64 == 0 && 1024 % AR_THREADS == 0);
const _: () = assert!(MAX_BLOCKS <= 0xffff, "the error word keeps 16 bits of block index");
const _: () = assert!(QUICK_MAX_BLOCKS <= 0xffff && signal_bytes(MAX_BLOCKS) == SIGNAL_BYTES);
const _: () = assert!(PARITIES == 2, "the kernel picks the mailbox by counter & 1");
const _: () = assert!(SIGNAL_BYTES >= MAILBOX_WORDS * 8 + COUNTER_WORDS * 4 && SIGNAL_BYTES % 256 == 0);

/// What a kernel reported in the error word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierErrorKind {
    /// The peer did not arrive in time.
    Timeout,
    /// The peer arrived with another call tag.
    Mismatch,
    /// The group failed (fault word raised) while the kernel waited.
    PeerFailed,
    /// The rank-data row did not hold this rank's input (unregistered capture).
    BadRow,
}

/// A decoded error word: which barrier (or packet wait) of which block failed on which peer,
/// and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarrierError {
    /// Timeout or mismatch.
    pub kind: BarrierErrorKind,
    /// Rank (in the custom allreduce's group) that did not arrive or differed.
    pub peer: usize,
    /// [`BARRIER_START`], [`BARRIER_MID`], [`BARRIER_END`], [`WAIT_HEADER`], [`WAIT_DATA`] or
    /// [`WAIT_RESULT`].
    pub barrier: u32,
    /// Block that saw it first.
    pub block: u32,
}

/// A 32-bit tag of one call (element count, dtype code, algorithm, and the words that place it
/// in the peers' memory: rank-data rows and offsets, where the call has them), announced with
/// every barrier so ranks making different calls stop with a mismatch instead of mixing data: a
/// peer reads and writes a rank's buffers through its own row at its own offset, so ranks must
/// agree on those too. Never zero, so a freshly zeroed mailbox cannot look like a tag.
pub fn call_tag(count: u64, dtype_code: u32, algo: u32, offsets: &[u64]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in [count, u64::from(dtype_code), u64::from(algo)].iter().chain(offsets) {
        for b in x.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    ((h >> 32) as u32 ^ h as u32) | 1
}

/// Decode the error word the kernels write
/// (`ERR_* kind bit | barrier << 32 | peer << 16 | block`).
pub fn decode_error(word: u64) -> Option<BarrierError> {
    let kind = if word & ERR_MISMATCH != 0 {
        BarrierErrorKind::Mismatch
    } else if word & ERR_TIMEOUT != 0 {
        BarrierErrorKind::Timeout
    } else if word & ERR_BAD_ROW != 0 {
        BarrierErrorKind::BadRow
    } else if word & ERR_PEER_FAILED != 0 {
        BarrierErrorKind::PeerFailed
    } else {
        return None;
    };
    Some(BarrierError {
        kind,
        peer: ((word >> 16) & 0xffff) as usize,
        barrier: ((word >> 32) & 0xff) as u32,
        block: (word & 0xffff) as u32,
    })
}

/// The defines every family gets: layout widths and the error word's kinds.
fn common_defines(world: usize) -> Vec<String> {
    vec![
        format!("-DTPCOMM_WORLD={world}"),
        format!("-DTPCOMM_MAX_RANKS={MAX_RANKS}"),
        format!("-DTPCOMM_VEC_BYTES={VEC_BYTES}"),
        format!("-DTPCOMM_ERR_TIMEOUT={ERR_TIMEOUT:#x}ull"),
        format!("-DTPCOMM_ERR_MISMATCH={ERR_MISMATCH:#x}ull"),
        format!("-DTPCOMM_ERR_PEER_FAILED={ERR_PEER_FAILED:#x}ull"),
        format!("-DTPCOMM_ERR_BAD_ROW={ERR_BAD_ROW:#x}ull"),
        format!("-DTPCOMM_FAULT_POLLS={FAULT_POLLS}"),
    ]
}

/// The NVRTC `-D` options for a custom module serving `world` ranks.
pub fn defines(world: usize) -> Vec<String> {
    let mut d = common_defines(world);
    d.extend([
        format!("-DTPCOMM_MAX_BLOCKS={MAX_BLOCKS}"),
        format!("-DTPCOMM_PARITIES={PARITIES}"),
        format!("-DTPCOMM_THREADS={THREADS}"),
        format!("-DTPCOMM_AR_THREADS={AR_THREADS}"),
        format!("-DTPCOMM_NORM_LATE_ROWS={NORM_LATE_ROWS}"),
        format!("-DTPCOMM_BARRIER_START={BARRIER_START}"),
        format!("-DTPCOMM_BARRIER_MID={BARRIER_MID}"),
        format!("-DTPCOMM_BARRIER_END={BARRIER_END}"),
    ]);
    d
}

/// The NVRTC `-D` options for a quick (quantized) module serving `world` ranks: the custom
/// family's, its group size and its gather barrier.
pub fn quick_defines(world: usize) -> Vec<String> {
    let mut d: Vec<String> = defines(world).into_iter().filter(|o| !o.starts_with("-DTPCOMM_MAX_BLOCKS=")).collect();
    d.extend([
        format!("-DTPCOMM_MAX_BLOCKS={QUICK_MAX_BLOCKS}"),
        format!("-DTPCOMM_QUICK_GROUP={QUICK_GROUP}"),
        format!("-DTPCOMM_BARRIER_GATHER={BARRIER_GATHER}"),
    ]);
    d
}

/// The NVRTC `-D` options for a packet module serving `world` ranks.
pub fn packet_defines(world: usize) -> Vec<String> {
    let mut d = common_defines(world);
    d.extend([
        format!("-DTPCOMM_PACKET_MAX_BLOCKS={PACKET_MAX_BLOCKS}"),
        format!("-DTPCOMM_PACKET_THREADS={PACKET_THREADS}"),
        format!("-DTPCOMM_LAMPORT_GENS={LAMPORT_GENS}"),
        format!("-DTPCOMM_WAIT_HEADER={WAIT_HEADER}"),
        format!("-DTPCOMM_WAIT_DATA={WAIT_DATA}"),
        format!("-DTPCOMM_WAIT_RESULT={WAIT_RESULT}"),
    ]);
    d
}

/// The tag of a packet call: [`call_tag`] with the top bit clear, so it is never the Lamport
/// sentinel word `0xffff_ffff` (and never zero).
pub fn packet_tag(count: u64, dtype_code: u32, algo: u32) -> u32 {
    call_tag(count, dtype_code, algo, &[]) & 0x7fff_ffff | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_word_round_trips() {
        assert_eq!(decode_error(0), None);
        let w = ERR_TIMEOUT | (u64::from(BARRIER_MID) << 32) | (5 << 16) | 17;
        let t = BarrierError { kind: BarrierErrorKind::Timeout, peer: 5, barrier: BARRIER_MID, block: 17 };
        assert_eq!(decode_error(w), Some(t));
        let m = ERR_MISMATCH | (u64::from(BARRIER_START) << 32) | (2 << 16);
        let e = BarrierError { kind: BarrierErrorKind::Mismatch, peer: 2, barrier: BARRIER_START, block: 0 };
        assert_eq!(decode_error(m), Some(e));
    }

    #[test]
    fn packet_layouts_hold_a_header_and_every_vector() {
        assert_eq!(ll_slots(16), 4);
        assert_eq!(ll_slots(17), 6);
        assert_eq!(lamport_slots(0), PACKET_MAX_BLOCKS, "a header per block");
        assert_eq!(ll_scratch_bytes(2, 16), 2 * 2 * 4 * 16);
        assert_eq!(lamport_bytes(3, 32), 2 * 3 * (PACKET_MAX_BLOCKS + 2) * 16);
        for count in [0, 1, 1 << 20] {
            assert_ne!(packet_tag(count, 2, 7), 0xffff_ffff);
            assert_ne!(call_tag(count, 2, 7, &[0, 64]), call_tag(count, 2, 7, &[64, 0]), "offsets are part of a call");
            assert_ne!(call_tag(count, 2, 7, &[0, 0]), call_tag(count, 2, 7, &[0, 16]));
            assert_eq!(packet_tag(count, 2, 7) & 1, 1);
        }
        assert!(packet_defines(5).iter().any(|d| d == "-DTPCOMM_WORLD=5"));
    }

    #[test]
    fn both_families_get_the_error_kinds_and_their_own_constants() {
        for d in [defines(3), packet_defines(3)] {
            assert!(d.iter().any(|x| x == "-DTPCOMM_WORLD=3"));
            for kind in ["ERR_TIMEOUT", "ERR_MISMATCH", "ERR_PEER_FAILED", "ERR_BAD_ROW", "FAULT_POLLS"] {
                assert!(d.iter().any(|x| x.starts_with(&format!("-DTPCOMM_{kind}="))), "{kind} missing");
            }
        }
        assert!(defines(3).iter().any(|x| x.starts_with("-DTPCOMM_BARRIER_MID=")));
        assert!(packet_defines(3).iter().any(|x| x.starts_with("-DTPCOMM_LAMPORT_GENS=")));
    }

    #[test]
    fn error_kinds_decode_by_priority() {
        let at = |kind: u64| kind | (u64::from(BARRIER_END) << 32) | (3 << 16) | 1;
        assert_eq!(decode_error(at(ERR_PEER_FAILED)).unwrap().kind, BarrierErrorKind::PeerFailed);
        assert_eq!(decode_error(at(ERR_BAD_ROW)).unwrap().kind, BarrierErrorKind::BadRow);
        assert_eq!(decode_error(at(ERR_TIMEOUT | ERR_PEER_FAILED)).unwrap().kind, BarrierErrorKind::Timeout);
        assert_eq!(decode_error(at(ERR_MISMATCH | ERR_TIMEOUT)).unwrap().kind, BarrierErrorKind::Mismatch);
    }
}
