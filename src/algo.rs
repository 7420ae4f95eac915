//! The algorithms, in one table.
//!
//! Every fact about an algorithm lives in one row of [`ALGOS`]: its name (for `TPCOMM_ALGO`,
//! `allreduce_perf --algo` and logs), the memory it reduces, the backend that runs it, whether
//! it sums in rank order, whether it is lossy, the pointer alignment its kernels need, and how
//! many bytes it moves through the memory of a GPU its ranks share (the floor `allreduce_perf`
//! prints). Names, error lists, the dispatch's checks and the benchmark's floors are all read
//! from here, so adding an algorithm is adding a row.

use crate::quant::Codec;
use std::fmt;
use std::str::FromStr;

/// An allreduce algorithm. The names are those of `TPCOMM_ALGO` and `allreduce_perf --algo`
/// ([`Algo::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algo {
    /// Host memory, one shared-memory round: every rank reads every rank's input.
    HostOneShot,
    /// Host memory, reduce-scatter then all-gather through shared memory.
    HostTwoShot,
    /// Device memory, CUDA IPC: every rank reads every rank's input (small messages).
    OneShot,
    /// Device memory, CUDA IPC: reduce-scatter into scratch, then all-gather.
    TwoShot,
    /// Device memory, LL packets all-pairs: every rank pushes its input to every peer with a
    /// flag per word; no barrier (small messages).
    Packet,
    /// Device memory, LL packets two-phase: shards pushed to their owners, results pushed back.
    PacketTwoPhase,
    /// Device memory, Lamport push: raw data into sentinel-filled buffers; no barrier, no flags.
    Lamport,
    /// Device memory, NCCL (large messages, several nodes, GPUs without P2P). Its summation
    /// order depends on size and layout, so deterministic mode never uses it.
    Nccl,
    /// Device memory: the custom IPC kernels called on consecutive chunks of at most
    /// `TPCOMM_CUSTOM_MAX_BYTES`, each an ordinary packet, one-shot or two-shot call. Every
    /// element is still summed in rank order, so the bits are those of an unchunked call.
    Chunked,
    /// Device memory, one rank: the sum of one input is the input, so the call is a
    /// device-to-device copy (nothing at all in place).
    Copy,
    /// Device memory, ranks on several nodes: each node sums the message with its IPC kernels,
    /// NCCL sums each local rank's shard across nodes, each node gathers the shards.
    Hierarchical,
    /// Device memory, CUDA IPC two-shot whose traffic is FP8 (e4m3) with a scale per 32 values:
    /// lossy, opt-in (`TPCOMM_QUICK`), the same bits on every rank ([`crate::quant`]).
    QuickFp8,
    /// The same with INT8 codes (QuickReduce's Q8).
    QuickInt8,
    /// The same with INT6 codes (QuickReduce's Q6).
    QuickInt6,
    /// The same with INT4 codes (QuickReduce's Q4).
    QuickInt4,
}

/// Where the buffers of a call live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// Ordinary host memory.
    Host,
    /// CUDA device memory.
    Device,
}

/// The backend that runs an algorithm's data movement (crate-private: the dispatch and the
/// device layer pick backends through it; no backend knows another).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BackendKind {
    /// Shared memory of one node (`backend/host.rs`).
    Host,
    /// CUDA IPC one-shot and two-shot (`backend/custom.rs`).
    Custom,
    /// Barrier-free LL and Lamport kernels (`backend/packet.rs`).
    Packet,
    /// NCCL (`backend/nccl.rs`).
    Nccl,
    /// Quantized two-shot over CUDA IPC (`backend/quick.rs`).
    Quick,
}

/// Which ranks an algorithm can span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Span {
    /// The ranks of one node (IPC kernels, shared memory).
    Node,
    /// Any layout.
    Any,
    /// One rank.
    One,
    /// Several nodes.
    Nodes,
}

/// One row of the algorithm table.
#[derive(Debug)]
pub(crate) struct AlgoInfo {
    pub algo: Algo,
    /// The `TPCOMM_ALGO` name.
    pub name: &'static str,
    pub memory: Memory,
    /// The backend that moves the data; `None` for algorithms made of other algorithms' steps
    /// (chunked, hierarchical) or of local copies.
    pub backend: Option<BackendKind>,
    pub span: Span,
    /// Element `i` is the sum over ranks `0..n-1` in that order in the accumulator, rounded
    /// once: the bits of `reference_sum`, equal on every rank for every size.
    pub rank_order: bool,
    /// The result differs from the exact sum by more than rounding (quantised algorithms).
    pub lossy: bool,
    /// Alignment in bytes that input and output pointers need (1: none).
    pub align: usize,
    /// Bytes moved through the memory of one GPU shared by `n` ranks reducing `s` bytes each.
    pub hbm_bytes: fn(f64, f64) -> f64,
    /// One line for docs and error messages.
    pub summary: &'static str,
}

/// Custom kernels' vector width: pointers must be aligned to it.
const VEC: usize = crate::runtime::protocol::ALIGN;

/// A quick row: bytes moved through one shared GPU by `n` ranks reducing `s` bytes of 16-bit
/// data each, with `wire` bytes per group of 32 values (64 bytes of data): every rank reads its
/// input, writes its encoded shards, its owner reads them, writes the encoded reduced shard to
/// every rank, every rank reads them and writes its output.
const fn quick_row(algo: Algo, name: &'static str, summary: &'static str) -> AlgoInfo {
    AlgoInfo {
        algo,
        name,
        memory: Memory::Device,
        backend: Some(BackendKind::Quick),
        span: Span::Node,
        rank_order: false,
        lossy: true,
        align: VEC,
        hbm_bytes: match algo {
            Algo::QuickInt6 => |n, s| n * (2.0 + 4.0 * 28.0 / 64.0) * s,
            Algo::QuickInt4 => |n, s| n * (2.0 + 4.0 * 20.0 / 64.0) * s,
            _ => |n, s| n * (2.0 + 4.0 * 36.0 / 64.0) * s,
        },
        summary,
    }
}

/// Every algorithm, one row each, in [`Algo`] order.
pub(crate) const ALGOS: [AlgoInfo; 15] = [
    AlgoInfo {
        algo: Algo::HostOneShot,
        name: "host_oneshot",
        memory: Memory::Host,
        backend: Some(BackendKind::Host),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: 1,
        hbm_bytes: |n, s| n * (n + 1.0) * s,
        summary: "host memory: every rank reads every rank's input from shared memory",
    },
    AlgoInfo {
        algo: Algo::HostTwoShot,
        name: "host_twoshot",
        memory: Memory::Host,
        backend: Some(BackendKind::Host),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: 1,
        hbm_bytes: |n, s| (3.0 * n + 1.0) * s,
        summary: "host memory: reduce-scatter then all-gather through shared memory",
    },
    AlgoInfo {
        algo: Algo::OneShot,
        name: "oneshot",
        memory: Memory::Device,
        backend: Some(BackendKind::Custom),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: VEC,
        hbm_bytes: |n, s| n * (n + 1.0) * s,
        summary: "CUDA IPC one-shot: every rank reads every rank's input",
    },
    AlgoInfo {
        algo: Algo::TwoShot,
        name: "twoshot",
        memory: Memory::Device,
        backend: Some(BackendKind::Custom),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: VEC,
        hbm_bytes: |n, s| (3.0 * n + 1.0) * s,
        summary: "CUDA IPC two-shot: reduce-scatter into scratch, all-gather",
    },
    AlgoInfo {
        algo: Algo::Packet,
        name: "packet",
        memory: Memory::Device,
        backend: Some(BackendKind::Packet),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: VEC,
        // LL packets are twice the data: pushed (n-1) times and read back by each rank.
        hbm_bytes: |n, s| n * (4.0 * n - 2.0) * s,
        summary: "LL packets, all-pairs: every rank pushes its input to every peer, no barrier",
    },
    AlgoInfo {
        algo: Algo::PacketTwoPhase,
        name: "packet2",
        memory: Memory::Device,
        backend: Some(BackendKind::Packet),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: VEC,
        hbm_bytes: |n, s| n * (8.0 * (n - 1.0) / n + 2.0) * s,
        summary: "LL packets, two-phase: shards to their owners, reduced shards back",
    },
    AlgoInfo {
        algo: Algo::Lamport,
        name: "lamport",
        memory: Memory::Device,
        backend: Some(BackendKind::Packet),
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: VEC,
        // Pushed, read and re-armed (n-1) times by each rank.
        hbm_bytes: |n, s| n * (3.0 * n - 1.0) * s,
        summary: "Lamport push: raw data into sentinel-filled buffers, no barrier, no flags",
    },
    AlgoInfo {
        algo: Algo::Nccl,
        name: "nccl",
        memory: Memory::Device,
        backend: Some(BackendKind::Nccl),
        span: Span::Any,
        rank_order: false,
        lossy: false,
        align: 1,
        hbm_bytes: |n, s| (3.0 * n + 1.0) * s,
        summary: "NCCL (its own order of addition: not rank-order bits)",
    },
    AlgoInfo {
        algo: Algo::Chunked,
        name: "chunked",
        memory: Memory::Device,
        backend: None,
        span: Span::Node,
        rank_order: true,
        lossy: false,
        align: VEC,
        hbm_bytes: |n, s| (3.0 * n + 1.0) * s,
        summary: "the IPC kernels on consecutive chunks of at most TPCOMM_CUSTOM_MAX_BYTES",
    },
    AlgoInfo {
        algo: Algo::Copy,
        name: "copy",
        memory: Memory::Device,
        backend: None,
        span: Span::One,
        rank_order: true,
        lossy: false,
        align: 1,
        hbm_bytes: |_, s| 2.0 * s,
        summary: "one rank: a device-to-device copy (nothing in place)",
    },
    AlgoInfo {
        algo: Algo::Hierarchical,
        name: "hier",
        memory: Memory::Device,
        backend: None,
        span: Span::Nodes,
        rank_order: false,
        lossy: false,
        align: VEC,
        hbm_bytes: |n, s| 2.0 * n * (n + 1.0) * s,
        summary: "several nodes: IPC kernels in each node, NCCL per local index between nodes",
    },
    quick_row(Algo::QuickFp8, "quick_fp8", "quantized two-shot, FP8 e4m3 codes, a scale per 32 values (lossy)"),
    quick_row(Algo::QuickInt8, "quick_int8", "quantized two-shot, INT8 codes, a scale per 32 values (lossy)"),
    quick_row(Algo::QuickInt6, "quick_int6", "quantized two-shot, INT6 codes, a scale per 32 values (lossy)"),
    quick_row(Algo::QuickInt4, "quick_int4", "quantized two-shot, INT4 codes, a scale per 32 values (lossy)"),
];

const _: () = {
    let mut i = 0;
    while i < ALGOS.len() {
        assert!(ALGOS[i].algo as usize == i, "ALGOS rows must follow the order of enum Algo");
        i += 1;
    }
};

impl Algo {
    /// Every algorithm, in a fixed order.
    pub const ALL: [Algo; 15] = [
        Algo::HostOneShot,
        Algo::HostTwoShot,
        Algo::OneShot,
        Algo::TwoShot,
        Algo::Packet,
        Algo::PacketTwoPhase,
        Algo::Lamport,
        Algo::Nccl,
        Algo::Chunked,
        Algo::Copy,
        Algo::Hierarchical,
        Algo::QuickFp8,
        Algo::QuickInt8,
        Algo::QuickInt6,
        Algo::QuickInt4,
    ];

    /// The quick algorithm of `codec`.
    pub const fn quick(codec: Codec) -> Algo {
        match codec {
            Codec::Fp8 => Algo::QuickFp8,
            Codec::Int8 => Algo::QuickInt8,
            Codec::Int6 => Algo::QuickInt6,
            Codec::Int4 => Algo::QuickInt4,
        }
    }

    /// The codec of a quick algorithm, `None` for the others.
    pub const fn codec(self) -> Option<Codec> {
        match self {
            Algo::QuickFp8 => Some(Codec::Fp8),
            Algo::QuickInt8 => Some(Codec::Int8),
            Algo::QuickInt6 => Some(Codec::Int6),
            Algo::QuickInt4 => Some(Codec::Int4),
            _ => None,
        }
    }

    pub(crate) const fn info(self) -> &'static AlgoInfo {
        &ALGOS[self as usize]
    }

    /// The name used by `TPCOMM_ALGO` and `--algo`.
    pub const fn as_str(self) -> &'static str {
        self.info().name
    }

    /// The kind of memory the algorithm reduces.
    pub const fn memory(self) -> Memory {
        self.info().memory
    }

    /// Whether element `i` of the result is the sum over ranks in rank order, rounded once (the
    /// same bits on every rank, for every size and every algorithm for which this is true).
    pub const fn sums_in_rank_order(self) -> bool {
        self.info().rank_order
    }

    /// Whether results differ from the exact sum by more than rounding.
    pub const fn is_lossy(self) -> bool {
        self.info().lossy
    }

    /// One line saying what the algorithm does.
    pub const fn summary(self) -> &'static str {
        self.info().summary
    }

    /// Bytes the algorithm moves through the memory of one GPU shared by `ranks` ranks that
    /// reduce `bytes` bytes each: the floor `allreduce_perf` divides by the copy bandwidth.
    pub fn hbm_floor_bytes(self, ranks: usize, bytes: usize) -> f64 {
        (self.info().hbm_bytes)(ranks as f64, bytes as f64)
    }

    /// The names of every algorithm of `memory`, for error messages.
    pub(crate) fn names_for(memory: Memory) -> String {
        let names: Vec<&str> = ALGOS.iter().filter(|a| a.memory == memory).map(|a| a.name).collect();
        names.join(", ")
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ALGOS.iter().find(|a| a.name == s).map(|a| a.algo).ok_or_else(|| {
            let names: Vec<&str> = ALGOS.iter().map(|a| a.name).collect();
            format!("auto or one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Memory::Host => "host",
            Memory::Device => "device",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_every_algorithm() {
        for a in Algo::ALL {
            assert_eq!(a.as_str().parse::<Algo>().unwrap(), a);
            assert_eq!(a.info().algo, a);
        }
        let err = "fastest".parse::<Algo>().unwrap_err();
        for a in Algo::ALL {
            assert!(err.contains(a.as_str()), "{err}");
        }
        assert_eq!(Algo::names_for(Memory::Host), "host_oneshot, host_twoshot");
    }

    #[test]
    fn only_nccl_its_composites_and_the_lossy_codecs_leave_rank_order() {
        let off: Vec<Algo> = Algo::ALL.into_iter().filter(|a| !a.sums_in_rank_order() && !a.is_lossy()).collect();
        assert_eq!(off, [Algo::Nccl, Algo::Hierarchical]);
        let lossy: Vec<Algo> = Algo::ALL.into_iter().filter(|a| a.is_lossy()).collect();
        assert_eq!(lossy, crate::quant::Codec::ALL.map(Algo::quick));
        for codec in crate::quant::Codec::ALL {
            assert_eq!(Algo::quick(codec).codec(), Some(codec));
            assert_eq!(Algo::quick(codec).as_str(), format!("quick_{codec}"));
        }
    }

    #[test]
    fn floors_grow_with_ranks_and_bytes() {
        for a in Algo::ALL {
            assert!(a.hbm_floor_bytes(4, 1 << 20) > a.hbm_floor_bytes(4, 1 << 10), "{a}");
        }
        assert_eq!(Algo::OneShot.hbm_floor_bytes(2, 100), 600.0);
    }
}
