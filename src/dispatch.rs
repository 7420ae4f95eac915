//! The dispatch table: which algorithm serves a call.
//!
//! The [`crate::Communicator`] describes each call as a [`Request`] (bytes, dtype, world size,
//! node layout, memory kind) and asks [`DispatchTable::choose`]. This is the only place that
//! decides between backends; backends never know of each other. `TPCOMM_ALGO` (or
//! [`crate::Config::algo`]) forces one algorithm; a forced algorithm that cannot serve the call is
//! an error naming the variable, never a silent fallback.

use crate::config::Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// An allreduce algorithm. The names are those of `TPCOMM_ALGO` and `allreduce_perf --algo`.
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
}

impl Algo {
    /// Every algorithm, in a fixed order.
    pub const ALL: &'static [Algo] = &[Algo::HostOneShot, Algo::HostTwoShot, Algo::OneShot, Algo::TwoShot];

    /// The name used by `TPCOMM_ALGO` and `--algo`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algo::HostOneShot => "host_oneshot",
            Algo::HostTwoShot => "host_twoshot",
            Algo::OneShot => "oneshot",
            Algo::TwoShot => "twoshot",
        }
    }

    /// The kind of memory the algorithm reduces.
    pub const fn memory(self) -> Memory {
        match self {
            Algo::HostOneShot | Algo::HostTwoShot => Memory::Host,
            Algo::OneShot | Algo::TwoShot => Memory::Device,
        }
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
        Algo::ALL.iter().copied().find(|a| a.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Algo::ALL.iter().map(|a| a.as_str()).collect();
            format!("auto or one of {}", names.join(", "))
        })
    }
}

/// Where the buffers of a call live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// Ordinary host memory.
    Host,
    /// CUDA device memory.
    Device,
}

/// What the dispatch table knows about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Bytes per rank.
    pub bytes: usize,
    /// Element type.
    pub dtype: DType,
    /// Ranks in the communicator.
    pub world_size: usize,
    /// Nodes the ranks span.
    pub nodes: usize,
    /// Kind of memory.
    pub memory: Memory,
}

/// Size thresholds between algorithms for one world size, from defaults and `TPCOMM_*`
/// overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchTable {
    /// Largest host message (bytes per rank) reduced one-shot.
    pub host_oneshot_max_bytes: usize,
    /// Largest device message (bytes per rank) the custom IPC kernels serve (their staging size).
    pub custom_max_bytes: usize,
    forced: Option<Algo>,
}

/// Host one-shot limit times the world size. One-shot makes every rank read all `n` inputs,
/// two-shot reads each input once but pays a second barrier; at 2 ranks they cross near
/// 256 KiB (bench/RESULTS.md), and one-shot's reads grow with `n`.
const HOST_ONESHOT_BYTES_TIMES_RANKS: usize = 512 << 10;

/// Largest device message reduced one-shot for `world` ranks: one-shot reads (n-1)*S per rank
/// against two-shot's ~2(n-1)/n*S plus a second barrier, so the crossover falls as n grows
/// (H100 NVLink figures of ALGORITHMS.md: 512 KiB at n <= 4, 256 KiB at n = 8).
pub const fn oneshot_max_bytes(world: usize) -> usize {
    if world <= 4 {
        512 << 10
    } else {
        256 << 10
    }
}

impl DispatchTable {
    /// The table for a configuration and a world size.
    pub fn new(config: &Config, world_size: usize) -> Self {
        DispatchTable {
            host_oneshot_max_bytes: config
                .host_oneshot_max_bytes
                .unwrap_or(HOST_ONESHOT_BYTES_TIMES_RANKS / world_size.max(1)),
            custom_max_bytes: config.custom_max_bytes,
            forced: config.algo,
        }
    }

    /// The algorithm for `req`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when a forced algorithm cannot serve this kind of memory.
    pub fn choose(&self, req: &Request) -> Result<Algo> {
        if let Some(algo) = self.forced {
            if algo.memory() != req.memory {
                return Err(Error::Unsupported {
                    what: format!("TPCOMM_ALGO={algo} for {:?} memory", req.memory),
                    reason: format!("{algo} reduces {:?} memory only; unset TPCOMM_ALGO", algo.memory()),
                });
            }
            return Ok(algo);
        }
        match req.memory {
            Memory::Host if req.bytes <= self.host_oneshot_max_bytes => Ok(Algo::HostOneShot),
            Memory::Host => Ok(Algo::HostTwoShot),
            Memory::Device if req.nodes > 1 => Err(Error::Unsupported {
                what: "allreduce of device memory across nodes".into(),
                reason: "the custom IPC kernels serve one node; no network backend is built in yet".into(),
            }),
            Memory::Device if req.bytes <= oneshot_max_bytes(req.world_size) => Ok(Algo::OneShot),
            Memory::Device if req.bytes <= self.custom_max_bytes => Ok(Algo::TwoShot),
            Memory::Device => Err(Error::Unsupported {
                what: format!("allreduce of {} bytes of device memory", req.bytes),
                reason: format!(
                    "the custom IPC kernels take at most TPCOMM_CUSTOM_MAX_BYTES={} bytes and no larger-message \
                     backend is built in yet",
                    self.custom_max_bytes
                ),
            }),
        }
    }
}

impl fmt::Display for DispatchTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(algo) = self.forced {
            return writeln!(f, "# every call: {algo} (forced by TPCOMM_ALGO)");
        }
        writeln!(f, "# host memory:   bytes <= {:>10}: {}", self.host_oneshot_max_bytes, Algo::HostOneShot)?;
        writeln!(f, "# host memory:   bytes >  {:>10}: {}", self.host_oneshot_max_bytes, Algo::HostTwoShot)?;
        writeln!(
            f,
            "# device memory: bytes <= {:>10}: {} (n <= 4; {} at n > 4)",
            oneshot_max_bytes(4),
            Algo::OneShot,
            oneshot_max_bytes(8)
        )?;
        writeln!(f, "# device memory: bytes <= {:>10}: {}", self.custom_max_bytes, Algo::TwoShot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(bytes: usize) -> Request {
        Request { bytes, dtype: DType::F32, world_size: 4, nodes: 1, memory: Memory::Host }
    }

    #[test]
    fn names_round_trip() {
        for a in Algo::ALL {
            assert_eq!(a.as_str().parse::<Algo>().unwrap(), *a);
        }
    }

    #[test]
    fn host_sizes_pick_by_threshold() {
        let t = DispatchTable::new(&Config { host_oneshot_max_bytes: Some(1000), ..Config::default() }, 4);
        assert_eq!(t.choose(&host(0)).unwrap(), Algo::HostOneShot);
        assert_eq!(t.choose(&host(1000)).unwrap(), Algo::HostOneShot);
        assert_eq!(t.choose(&host(1001)).unwrap(), Algo::HostTwoShot);
    }

    #[test]
    fn default_host_limit_shrinks_with_ranks() {
        let two = DispatchTable::new(&Config::default(), 2).host_oneshot_max_bytes;
        let eight = DispatchTable::new(&Config::default(), 8).host_oneshot_max_bytes;
        assert_eq!(two, 256 << 10);
        assert_eq!(eight, 64 << 10);
    }

    #[test]
    fn forced_algorithm_wins_and_is_checked() {
        let t = DispatchTable::new(&Config { algo: Some(Algo::HostTwoShot), ..Config::default() }, 4);
        assert_eq!(t.choose(&host(8)).unwrap(), Algo::HostTwoShot);
        let dev = Request { memory: Memory::Device, ..host(8) };
        assert!(matches!(t.choose(&dev), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn device_sizes_follow_the_world_size() {
        let t = DispatchTable::new(&Config { custom_max_bytes: 8 << 20, ..Config::default() }, 4);
        let dev = |bytes, world_size| Request { bytes, world_size, memory: Memory::Device, ..host(0) };
        assert_eq!(t.choose(&dev(512 << 10, 4)).unwrap(), Algo::OneShot);
        assert_eq!(t.choose(&dev((512 << 10) + 1, 4)).unwrap(), Algo::TwoShot);
        assert_eq!(t.choose(&dev(256 << 10, 8)).unwrap(), Algo::OneShot);
        assert_eq!(t.choose(&dev((256 << 10) + 1, 8)).unwrap(), Algo::TwoShot);
        assert_eq!(t.choose(&dev(8 << 20, 8)).unwrap(), Algo::TwoShot);
        assert!(matches!(t.choose(&dev((8 << 20) + 1, 8)), Err(Error::Unsupported { .. })));
        let forced = DispatchTable::new(&Config { algo: Some(Algo::OneShot), ..Config::default() }, 4);
        assert!(matches!(forced.choose(&host(8)), Err(Error::Unsupported { .. })));
        assert_eq!(forced.choose(&dev(64 << 20, 2)).unwrap(), Algo::OneShot);
    }
}
