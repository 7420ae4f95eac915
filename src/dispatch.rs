//! The dispatch table: which algorithm serves a call.
//!
//! The [`crate::Communicator`] describes each call as a [`Request`] (bytes, dtype, world size,
//! node layout, memory kind, which backends can run) and asks [`DispatchTable::choose`]. This is the only place that
//! decides between backends; backends never know of each other. `TPCOMM_ALGO` (or
//! [`crate::Config::algo`]) forces one algorithm; a forced algorithm that cannot serve the call is
//! an error naming the variable, never a silent fallback.

use crate::config::Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::fmt;
use std::path::Path;
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
    /// `TPCOMM_CUSTOM_MAX_BYTES`, each an ordinary packet, one-shot or two-shot call. Every element is
    /// still summed in rank order, so the bits are those of an unchunked call. Serves messages
    /// over the custom limit in deterministic mode, and where NCCL is not installed.
    Chunked,
    /// Device memory, one rank: the sum of one input is the input, so the call is a
    /// device-to-device copy (nothing at all in place). No kernel, no backend.
    Copy,
    /// Device memory, ranks on several nodes: each node sums the message with its IPC kernels,
    /// NCCL sums each local rank's shard across nodes, each node gathers the shards (the plan
    /// of [`crate::hierarchy`]).
    Hierarchical,
}

impl Algo {
    /// Every algorithm, in a fixed order.
    pub const ALL: &'static [Algo] = &[
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
    ];

    /// The name used by `TPCOMM_ALGO` and `--algo`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algo::HostOneShot => "host_oneshot",
            Algo::HostTwoShot => "host_twoshot",
            Algo::OneShot => "oneshot",
            Algo::TwoShot => "twoshot",
            Algo::Packet => "packet",
            Algo::PacketTwoPhase => "packet2",
            Algo::Lamport => "lamport",
            Algo::Nccl => "nccl",
            Algo::Chunked => "chunked",
            Algo::Copy => "copy",
            Algo::Hierarchical => "hier",
        }
    }

    /// The kind of memory the algorithm reduces.
    pub const fn memory(self) -> Memory {
        match self {
            Algo::HostOneShot | Algo::HostTwoShot => Memory::Host,
            Algo::OneShot
            | Algo::TwoShot
            | Algo::Packet
            | Algo::PacketTwoPhase
            | Algo::Lamport
            | Algo::Nccl
            | Algo::Chunked
            | Algo::Copy
            | Algo::Hierarchical => Memory::Device,
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
    /// The custom IPC kernels can run among the ranks of each node (every pair of GPUs in use
    /// on a node with P2P access). Ignored for host memory.
    pub custom_available: bool,
    /// NCCL can run: libnccl loads on every rank and no two ranks share a GPU (NCCL refuses
    /// that). Ignored for host memory.
    pub nccl_available: bool,
}

impl Request {
    /// A request for `bytes` of `dtype` in `memory`, with both device backends available.
    pub fn new(bytes: usize, dtype: DType, world_size: usize, nodes: usize, memory: Memory) -> Self {
        Request { bytes, dtype, world_size, nodes, memory, custom_available: true, nccl_available: true }
    }
}

/// Size thresholds between algorithms for one world size, from defaults and `TPCOMM_*`
/// overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchTable {
    /// Largest host message (bytes per rank) reduced one-shot.
    pub host_oneshot_max_bytes: usize,
    /// Largest device message (bytes per rank) reduced by LL packets (all-pairs).
    pub packet_max_bytes: usize,
    /// Largest device message (bytes per rank) reduced one-shot.
    pub oneshot_max_bytes: usize,
    /// Largest device message (bytes per rank) the custom IPC kernels serve (their staging size).
    pub custom_max_bytes: usize,
    /// Deterministic mode (`TPCOMM_DETERMINISTIC`): never NCCL, chunked custom calls instead.
    pub deterministic: bool,
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

/// Largest device message reduced by packets for `world` ranks. All-pairs packets push
/// `(n - 1) * 2 * S` bytes per rank (the flags double it) but skip one-shot's two barriers; on
/// one H100 shared by all ranks they beat one-shot up to 64 KiB at 2 ranks, 32 KiB at 4 and
/// 16 KiB at 8 (bench/RESULTS.md).
pub const fn packet_max_bytes(world: usize) -> usize {
    if world <= 2 {
        64 << 10
    } else if world <= 4 {
        32 << 10
    } else {
        16 << 10
    }
}

impl DispatchTable {
    /// The table for a configuration and a world size.
    pub fn new(config: &Config, world_size: usize) -> Self {
        DispatchTable {
            host_oneshot_max_bytes: config
                .host_oneshot_max_bytes
                .unwrap_or(HOST_ONESHOT_BYTES_TIMES_RANKS / world_size.max(1)),
            packet_max_bytes: config
                .packet_max_bytes
                .unwrap_or(packet_max_bytes(world_size))
                .min(config.packet_buffer_bytes),
            oneshot_max_bytes: config.oneshot_max_bytes.unwrap_or(oneshot_max_bytes(world_size)),
            custom_max_bytes: config.custom_max_bytes,
            deterministic: config.deterministic,
            forced: config.algo,
        }
    }

    /// Read thresholds saved by [`DispatchTable::save`] (the text of the file at `path`) into
    /// this table, except those the configuration set explicitly (`TPCOMM_*_MAX_BYTES` win over
    /// a tuned file).
    ///
    /// # Errors
    /// [`Error::Config`] when the text is malformed or was tuned for another machine or layout
    /// (`key` differs).
    pub fn load(&mut self, text: &str, path: &Path, key: &TuneKey, config: &Config) -> Result<()> {
        let bad =
            |expected: String| Error::Config { key: "TPCOMM_TUNE_FILE", value: path.display().to_string(), expected };
        let mut found_key = None;
        let (mut host, mut device, mut packet) = (None, None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (name, value) =
                line.split_once(' ').ok_or_else(|| bad(format!("\"name value\" lines, not {line:?}")))?;
            let number =
                || value.trim().parse::<usize>().map_err(|_| bad(format!("a number for {name}, not {value:?}")));
            match name {
                "key" => found_key = Some(value.trim().to_string()),
                "host_oneshot_max_bytes" => host = Some(number()?),
                "oneshot_max_bytes" => device = Some(number()?),
                "packet_max_bytes" => packet = Some(number()?),
                other => {
                    return Err(bad(format!(
                        "known names (key, host_oneshot_max_bytes, oneshot_max_bytes, packet_max_bytes), not {other}"
                    )))
                }
            }
        }
        if found_key.as_deref() != Some(key.0.as_str()) {
            return Err(bad(format!(
                "a table tuned for this machine and layout ({}), not for {}; run `allreduce_perf --autotune` again",
                key.0,
                found_key.unwrap_or_else(|| "an unnamed one".into())
            )));
        }
        if let (Some(v), None) = (host, config.host_oneshot_max_bytes) {
            self.host_oneshot_max_bytes = v;
        }
        if let (Some(v), None) = (device, config.oneshot_max_bytes) {
            self.oneshot_max_bytes = v;
        }
        if let (Some(v), None) = (packet, config.packet_max_bytes) {
            self.packet_max_bytes = v.min(config.packet_buffer_bytes);
        }
        Ok(())
    }

    /// Write the tuned thresholds to `path` under `key`.
    ///
    /// # Errors
    /// [`Error::System`] when the file cannot be written.
    pub fn save(&self, path: &Path, key: &TuneKey) -> Result<()> {
        let text = format!(
            "# tpcomm dispatch table, tuned by Communicator::tune\nkey {}\nhost_oneshot_max_bytes {}\n\
             packet_max_bytes {}\noneshot_max_bytes {}\n",
            key.0, self.host_oneshot_max_bytes, self.packet_max_bytes, self.oneshot_max_bytes
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| Error::System { op: format!("creating {}", dir.display()), source })?;
        }
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| Error::System { op: format!("writing tuned dispatch table {}", path.display()), source })
    }

    /// The algorithm for `req`.
    ///
    /// Device memory: one-shot up to `oneshot_max_bytes`, two-shot up to `custom_max_bytes`,
    /// NCCL above (or [`Algo::Chunked`] where NCCL is not installed) and wherever the custom
    /// kernels cannot run (several nodes, no P2P). In deterministic mode NCCL is never chosen:
    /// large messages go [`Algo::Chunked`], and layouts without the custom kernels are refused.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when a forced algorithm cannot serve this kind of memory, or no
    /// backend can serve the call (naming why and what to change); [`Error::Config`] for
    /// `TPCOMM_ALGO=nccl` in deterministic mode.
    pub fn choose(&self, req: &Request) -> Result<Algo> {
        if let Some(algo) = self.forced {
            if algo.memory() != req.memory {
                return Err(Error::Unsupported {
                    what: format!("TPCOMM_ALGO={algo} for {:?} memory", req.memory),
                    reason: format!("{algo} reduces {:?} memory only; unset TPCOMM_ALGO", algo.memory()),
                });
            }
            if matches!(algo, Algo::Nccl | Algo::Hierarchical) && self.deterministic {
                return Err(Error::Config {
                    key: "TPCOMM_ALGO",
                    value: algo.to_string(),
                    expected: "another algorithm (or auto) while TPCOMM_DETERMINISTIC=1: NCCL does not sum in a \
                               fixed rank order"
                        .into(),
                });
            }
            return Ok(algo);
        }
        if req.memory == Memory::Host {
            return Ok(if req.bytes <= self.host_oneshot_max_bytes { Algo::HostOneShot } else { Algo::HostTwoShot });
        }
        if req.world_size == 1 {
            return Ok(Algo::Copy);
        }
        // Across nodes: the IPC kernels inside each node and NCCL between them, while the
        // message fits the staging buffers; flat NCCL beyond (bandwidth-bound, NCCL's rings).
        let hierarchical = req.nodes > 1 && req.custom_available && req.nccl_available && !self.deterministic;
        if hierarchical && req.bytes <= self.custom_max_bytes {
            return Ok(Algo::Hierarchical);
        }
        let custom = req.custom_available && req.nodes == 1;
        if !custom {
            let why = if req.nodes > 1 {
                format!("the ranks span {} nodes and the custom IPC kernels serve one node", req.nodes)
            } else {
                "the GPUs in use cannot access each other (no P2P), which the custom IPC kernels need".to_string()
            };
            if self.deterministic {
                return Err(Error::Unsupported {
                    what: "deterministic allreduce of device memory".into(),
                    reason: format!(
                        "{why}, and NCCL, which would serve it, does not sum in a fixed rank order; unset \
                         TPCOMM_DETERMINISTIC, or reduce host copies of the data (host memory is deterministic)"
                    ),
                });
            }
            if !req.nccl_available {
                return Err(Error::Unsupported {
                    what: "allreduce of device memory".into(),
                    reason: format!(
                        "{why}, and NCCL cannot run here: install NCCL (libnccl.so.2) on every node and give \
                         each rank its own GPU"
                    ),
                });
            }
            return Ok(Algo::Nccl);
        }
        Ok(if req.bytes <= self.packet_max_bytes {
            Algo::Packet
        } else if req.bytes <= self.oneshot_max_bytes {
            Algo::OneShot
        } else if req.bytes <= self.custom_max_bytes {
            Algo::TwoShot
        } else if self.deterministic || !req.nccl_available {
            Algo::Chunked
        } else {
            Algo::Nccl
        })
    }

    /// The algorithm for one chunk of an [`Algo::Chunked`] call: `req` with `bytes` at most
    /// `custom_max_bytes`, chosen as an unforced call would be (packet, one-shot or two-shot).
    ///
    /// # Errors
    /// [`Error::Internal`] when `req` is larger than a chunk may be.
    pub fn choose_chunk(&self, req: &Request) -> Result<Algo> {
        if req.bytes > self.custom_max_bytes {
            return Err(Error::Internal(format!(
                "chunk of {} bytes over the custom limit of {}",
                req.bytes, self.custom_max_bytes
            )));
        }
        let unforced = DispatchTable { forced: None, ..self.clone() };
        unforced.choose(&Request { custom_available: true, ..*req })
    }

    /// The algorithm for the node-local steps of an [`Algo::Hierarchical`] call: `req` as a
    /// one-node call without NCCL (packet, one-shot, two-shot or chunked), never forced.
    ///
    /// # Errors
    /// As [`DispatchTable::choose`].
    pub fn choose_within_node(&self, req: &Request) -> Result<Algo> {
        let unforced = DispatchTable { forced: None, ..self.clone() };
        unforced.choose(&Request { nodes: 1, custom_available: true, nccl_available: false, ..*req })
    }
}

impl fmt::Display for DispatchTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(algo) = self.forced {
            return writeln!(f, "# every call: {algo} (forced by TPCOMM_ALGO)");
        }
        writeln!(f, "# host memory:   bytes <= {:>10}: {}", self.host_oneshot_max_bytes, Algo::HostOneShot)?;
        writeln!(f, "# host memory:   bytes >  {:>10}: {}", self.host_oneshot_max_bytes, Algo::HostTwoShot)?;
        writeln!(f, "# device memory: one rank: {} (no kernel)", Algo::Copy)?;
        writeln!(f, "# device memory: bytes <= {:>10}: {}", self.packet_max_bytes, Algo::Packet)?;
        writeln!(f, "# device memory: bytes <= {:>10}: {}", self.oneshot_max_bytes, Algo::OneShot)?;
        writeln!(f, "# device memory: bytes <= {:>10}: {}", self.custom_max_bytes, Algo::TwoShot)?;
        if self.deterministic {
            writeln!(
                f,
                "# device memory: bytes >  {:>10}: {} (deterministic: custom kernels in chunks of at most {} bytes)",
                self.custom_max_bytes,
                Algo::Chunked,
                self.custom_max_bytes
            )?;
            writeln!(f, "# device memory: several nodes or no P2P: unsupported (deterministic mode never uses NCCL)")
        } else {
            writeln!(
                f,
                "# device memory: bytes >  {:>10}: {} ({} where libnccl.so.2 is missing)",
                self.custom_max_bytes,
                Algo::Nccl,
                Algo::Chunked
            )?;
            writeln!(
                f,
                "# device memory: several nodes: bytes <= {:>10}: {} (IPC kernels in each node, NCCL between), \
                 larger: {}",
                self.custom_max_bytes,
                Algo::Hierarchical,
                Algo::Nccl
            )?;
            writeln!(f, "# device memory: no P2P: {} (any size)", Algo::Nccl)
        }
    }
}

/// What a tuned table is valid for: the machine (CPU model, GPU model) and the layout (world
/// size, ranks per node, nodes). A table tuned elsewhere is refused, not silently used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TuneKey(pub String);

impl TuneKey {
    /// The key of this machine for a layout: `ranks_per_node[i]` ranks on node `i`.
    pub fn new(world_size: usize, ranks_per_node: &[usize]) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let gpu = crate::topology::gpu_name(0).unwrap_or_else(|| "none".into());
        let clean = |s: &str| s.split_whitespace().collect::<Vec<_>>().join("_");
        TuneKey(format!(
            "cpu={} gpu={} world={world_size} ranks_per_node={}",
            clean(&cpu),
            clean(&gpu),
            ranks_per_node.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
        ))
    }
}

/// The crossover of two algorithms from timings over increasing `sizes`: the limit `t`
/// (0 or one of `sizes`) such that using `first` up to `t` and `second` above costs the least
/// summed time relative to the faster of the two at each size. A single noisy size cannot cut
/// the range short, and every size counts alike whatever its absolute time.
pub fn crossover(sizes: &[usize], first: &[f64], second: &[f64]) -> usize {
    let rel = |i: usize, t: f64| t / first[i].min(second[i]).max(f64::MIN_POSITIVE);
    (0..=sizes.len())
        .map(|k| {
            let cost: f64 = (0..sizes.len()).map(|i| if i < k { rel(i, first[i]) } else { rel(i, second[i]) }).sum();
            (if k == 0 { 0 } else { sizes[k - 1] }, cost)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(limit, _)| limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossover_minimises_the_summed_relative_time() {
        let sizes = [4096, 8192, 16384, 32768];
        assert_eq!(crossover(&sizes, &[1.0, 2.0, 3.0, 9.0], &[1.5, 2.5, 2.95, 4.0]), 8192);
        // One noisy size where the second wins does not end the first's range early.
        assert_eq!(crossover(&sizes, &[1.0, 1.05, 1.0, 9.0], &[2.0, 1.0, 2.0, 4.0]), 16384);
        assert_eq!(crossover(&sizes, &[2.0, 2.0, 2.0, 2.0], &[1.0, 1.0, 1.0, 1.0]), 0);
        assert_eq!(crossover(&sizes, &[1.0; 4], &[2.0; 4]), 32768);
    }

    #[test]
    fn tuned_tables_round_trip_and_refuse_other_machines() {
        let dir = std::env::temp_dir().join(format!("tpcomm-tune-{}", std::process::id()));
        let path = dir.join("table.txt");
        let key = TuneKey("cpu=X gpu=none world=2 ranks_per_node=2 nodes=1".into());
        let mut tuned = DispatchTable::new(&Config::default(), 2);
        tuned.host_oneshot_max_bytes = 12345;
        tuned.oneshot_max_bytes = 777;
        tuned.packet_max_bytes = 96;
        tuned.save(&path, &key).unwrap();
        let mut loaded = DispatchTable::new(&Config::default(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        loaded.load(&text, &path, &key, &Config::default()).unwrap();
        assert_eq!(loaded, tuned);
        // An explicit environment override wins over the file.
        let config = Config { host_oneshot_max_bytes: Some(5), ..Config::default() };
        let mut overridden = DispatchTable::new(&config, 2);
        overridden.load(&text, &path, &key, &config).unwrap();
        assert_eq!((overridden.host_oneshot_max_bytes, overridden.oneshot_max_bytes), (5, 777));
        let other = TuneKey("cpu=Y gpu=none world=2 ranks_per_node=2 nodes=1".into());
        let err = DispatchTable::new(&Config::default(), 2).load(&text, &path, &other, &Config::default()).unwrap_err();
        assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("--autotune"), "{err}");
        let garbled = format!("key {}\nhost_oneshot_max_bytes lots\n", key.0);
        assert!(DispatchTable::new(&Config::default(), 2).load(&garbled, &path, &key, &Config::default()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn host(bytes: usize) -> Request {
        Request::new(bytes, DType::F32, 4, 1, Memory::Host)
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
        let config = Config { custom_max_bytes: 8 << 20, ..Config::default() };
        let (t, t8) = (DispatchTable::new(&config, 4), DispatchTable::new(&config, 8));
        let dev = |bytes, world_size| Request { bytes, world_size, memory: Memory::Device, ..host(0) };
        assert_eq!(t.choose(&dev(512 << 10, 4)).unwrap(), Algo::OneShot);
        assert_eq!(t.choose(&dev((512 << 10) + 1, 4)).unwrap(), Algo::TwoShot);
        assert_eq!(t8.choose(&dev(256 << 10, 8)).unwrap(), Algo::OneShot);
        assert_eq!(t8.choose(&dev((256 << 10) + 1, 8)).unwrap(), Algo::TwoShot);
        assert_eq!(t8.choose(&dev(8 << 20, 8)).unwrap(), Algo::TwoShot);
        assert_eq!(t8.choose(&dev((8 << 20) + 1, 8)).unwrap(), Algo::Nccl);
        let env = DispatchTable::new(&Config { oneshot_max_bytes: Some(1 << 20), ..config }, 8);
        assert_eq!(env.choose(&dev(1 << 20, 8)).unwrap(), Algo::OneShot);
        let forced = DispatchTable::new(&Config { algo: Some(Algo::OneShot), ..Config::default() }, 4);
        assert!(matches!(forced.choose(&host(8)), Err(Error::Unsupported { .. })));
        assert_eq!(forced.choose(&dev(64 << 20, 2)).unwrap(), Algo::OneShot);
    }

    #[test]
    fn small_device_messages_go_to_packets_within_their_buffer() {
        let dev = |bytes, world_size| Request { bytes, world_size, memory: Memory::Device, ..host(0) };
        let t = DispatchTable::new(&Config::default(), 2);
        assert_eq!(t.choose(&dev(0, 2)).unwrap(), Algo::Packet);
        assert_eq!(t.choose(&dev(packet_max_bytes(2), 2)).unwrap(), Algo::Packet);
        assert_eq!(t.choose(&dev(packet_max_bytes(2) + 1, 2)).unwrap(), Algo::OneShot);
        let t8 = DispatchTable::new(&Config::default(), 8);
        assert_eq!(t8.choose(&dev(packet_max_bytes(8) + 1, 8)).unwrap(), Algo::OneShot);
        // An override is capped by the buffer the packet kernels have.
        let big = Config { packet_max_bytes: Some(4 << 20), packet_buffer_bytes: 1 << 20, ..Config::default() };
        assert_eq!(DispatchTable::new(&big, 2).packet_max_bytes, 1 << 20);
        let off = Config { packet_max_bytes: Some(0), ..Config::default() };
        assert_eq!(DispatchTable::new(&off, 2).choose(&dev(16, 2)).unwrap(), Algo::OneShot);
        // One rank: a copy, whatever the size; a forced algorithm still runs its kernel.
        for bytes in [0, 4096, 64 << 20] {
            assert_eq!(t.choose(&dev(bytes, 1)).unwrap(), Algo::Copy);
        }
        let forced = DispatchTable::new(&Config { algo: Some(Algo::Lamport), ..Config::default() }, 1);
        assert_eq!(forced.choose(&dev(4096, 1)).unwrap(), Algo::Lamport);
        for name in ["packet", "packet2", "lamport", "copy"] {
            assert_eq!(name.parse::<Algo>().unwrap().memory(), Memory::Device);
        }
    }

    fn device(bytes: usize) -> Request {
        Request::new(bytes, DType::BF16, 4, 1, Memory::Device)
    }

    fn table(config: Config) -> DispatchTable {
        DispatchTable::new(&Config { custom_max_bytes: 8 << 20, oneshot_max_bytes: Some(512 << 10), ..config }, 4)
    }

    #[test]
    fn nccl_serves_large_messages_and_layouts_without_custom_kernels() {
        let t = table(Config::default());
        assert_eq!(t.choose(&device(8 << 20)).unwrap(), Algo::TwoShot);
        assert_eq!(t.choose(&device((8 << 20) + 1)).unwrap(), Algo::Nccl);
        assert_eq!(t.choose(&device(1 << 30)).unwrap(), Algo::Nccl);
        // GPUs without P2P: NCCL at every size, even the smallest. Several nodes: the
        // hierarchy up to the staging size, flat NCCL above it, NCCL alone where the IPC kernels
        // cannot run inside the nodes.
        for bytes in [0, 16, 512 << 10, 64 << 20] {
            assert_eq!(t.choose(&Request { custom_available: false, ..device(bytes) }).unwrap(), Algo::Nccl);
            let no_p2p = Request { nodes: 2, custom_available: false, ..device(bytes) };
            assert_eq!(t.choose(&no_p2p).unwrap(), Algo::Nccl, "{bytes}");
        }
        for bytes in [0, 16, 512 << 10, 8 << 20] {
            assert_eq!(t.choose(&Request { nodes: 2, ..device(bytes) }).unwrap(), Algo::Hierarchical, "{bytes}");
        }
        assert_eq!(t.choose(&Request { nodes: 2, ..device((8 << 20) + 16) }).unwrap(), Algo::Nccl);
        // The node steps of the hierarchy: one-node choices without NCCL, never forced.
        let forced = table(Config { algo: Some(Algo::Hierarchical), ..Config::default() });
        assert_eq!(forced.choose_within_node(&Request { nodes: 2, ..device(64) }).unwrap(), Algo::Packet);
        assert_eq!(forced.choose_within_node(&Request { nodes: 2, ..device(64 << 20) }).unwrap(), Algo::Chunked);
        // Host memory never goes to NCCL.
        assert_eq!(t.choose(&Request { nodes: 2, ..host(64 << 20) }).unwrap(), Algo::HostTwoShot);
    }

    #[test]
    fn without_libnccl_large_messages_go_chunked_and_other_layouts_fail() {
        let t = table(Config::default());
        let no_nccl = |r: Request| Request { nccl_available: false, ..r };
        assert_eq!(t.choose(&no_nccl(device(512 << 10))).unwrap(), Algo::OneShot);
        assert_eq!(t.choose(&no_nccl(device((8 << 20) + 1))).unwrap(), Algo::Chunked);
        let err = t.choose(&no_nccl(Request { nodes: 2, ..device(64) })).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }) && err.to_string().contains("libnccl"), "{err}");
        let err = t.choose(&no_nccl(Request { custom_available: false, ..device(64) })).unwrap_err();
        assert!(err.to_string().contains("P2P") && err.to_string().contains("libnccl"), "{err}");
    }

    #[test]
    fn deterministic_mode_never_chooses_nccl() {
        let t = table(Config { deterministic: true, ..Config::default() });
        assert_eq!(t.choose(&device(512 << 10)).unwrap(), Algo::OneShot);
        assert_eq!(t.choose(&device((512 << 10) + 1)).unwrap(), Algo::TwoShot);
        assert_eq!(t.choose(&device(8 << 20)).unwrap(), Algo::TwoShot);
        for bytes in [(8 << 20) + 1, 64 << 20, (1 << 34) + 3] {
            assert_eq!(t.choose(&device(bytes)).unwrap(), Algo::Chunked, "{bytes}");
            assert_eq!(t.choose(&Request { nccl_available: false, ..device(bytes) }).unwrap(), Algo::Chunked);
        }
        for req in [Request { nodes: 2, ..device(64) }, Request { custom_available: false, ..device(64 << 20) }] {
            let err = t.choose(&req).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Unsupported { .. }), "{text}");
            assert!(text.contains("deterministic") && text.contains("TPCOMM_DETERMINISTIC"), "{text}");
        }
        // Host memory is unchanged.
        assert_eq!(t.choose(&host(64 << 20)).unwrap(), Algo::HostTwoShot);
    }

    #[test]
    fn chunks_are_chosen_as_unforced_custom_calls() {
        for config in [
            Config { deterministic: true, ..Config::default() },
            Config { algo: Some(Algo::Chunked), ..Config::default() },
        ] {
            let t = table(config);
            assert_eq!(t.choose_chunk(&device(4096)).unwrap(), Algo::Packet);
            assert_eq!(t.choose_chunk(&device(t.packet_max_bytes + 16)).unwrap(), Algo::OneShot);
            assert_eq!(t.choose_chunk(&device(8 << 20)).unwrap(), Algo::TwoShot);
            assert!(matches!(t.choose_chunk(&device((8 << 20) + 16)), Err(Error::Internal(_))));
        }
    }

    #[test]
    fn forced_device_algorithms() {
        let forced = |algo| table(Config { algo: Some(algo), ..Config::default() });
        // Forced NCCL serves any device size and layout, never host memory.
        for req in [device(16), device(1 << 30), Request { nodes: 3, ..device(16) }] {
            assert_eq!(forced(Algo::Nccl).choose(&req).unwrap(), Algo::Nccl);
        }
        let err = forced(Algo::Nccl).choose(&host(16)).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }) && err.to_string().contains("TPCOMM_ALGO=nccl"), "{err}");
        assert!(matches!(forced(Algo::Chunked).choose(&host(16)), Err(Error::Unsupported { .. })));
        assert_eq!(forced(Algo::Chunked).choose(&device(16)).unwrap(), Algo::Chunked);
        // NCCL forced in deterministic mode (a Config built in code, past Config::validate).
        let t = table(Config { algo: Some(Algo::Nccl), deterministic: true, ..Config::default() });
        let err = t.choose(&device(16)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{text}");
        assert!(text.contains("TPCOMM_ALGO") && text.contains("TPCOMM_DETERMINISTIC"), "{text}");
        // Other forced algorithms stay allowed in deterministic mode.
        let t = table(Config { algo: Some(Algo::TwoShot), deterministic: true, ..Config::default() });
        assert_eq!(t.choose(&device(64 << 20)).unwrap(), Algo::TwoShot);
    }

    #[test]
    fn the_printed_table_names_the_nccl_and_deterministic_rows() {
        let text = table(Config::default()).to_string();
        assert!(text.contains("nccl") && text.contains("no P2P: nccl") && text.contains("hier"), "{text}");
        let text = table(Config { deterministic: true, ..Config::default() }).to_string();
        assert!(text.contains("chunked") && text.contains("unsupported") && !text.contains(": nccl"), "{text}");
    }
}
