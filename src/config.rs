//! Run-time configuration: one table of `TPCOMM_*` parameters.
//!
//! [`Config::from_env`] reads every variable whose name starts with `TPCOMM_`. A value tpcomm
//! cannot parse, or a `TPCOMM_*` name it does not know (a typo), is an error rather than being
//! ignored. [`Config::dump`] prints every parameter with its value and its meaning;
//! `allreduce_perf --show-config` shows it.

use crate::algo::Algo;
use crate::error::{Error, Result};
use std::time::Duration;

/// Settings of a [`crate::Communicator`]. Start from [`Config::default`] or [`Config::from_env`]
/// and change fields as needed; every rank must use the same values.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long any wait on a peer may take before it becomes [`Error::PeerTimeout`]
    /// (`TPCOMM_TIMEOUT_MS`).
    pub timeout: Duration,
    /// Force one algorithm for every call instead of the dispatch table's choice (`TPCOMM_ALGO`).
    /// A forced algorithm that cannot serve a call is an error, not a silent fallback.
    pub algo: Option<Algo>,
    /// Host buffers up to this many bytes use the one-shot algorithm, larger ones two-shot
    /// (`TPCOMM_HOST_ONESHOT_MAX_BYTES`; `None` keeps the dispatch table's default).
    pub host_oneshot_max_bytes: Option<usize>,
    /// Bytes per rank of each shared-memory slot of the host backend; larger messages are
    /// reduced in chunks of this size (`TPCOMM_HOST_CHUNK_BYTES`).
    pub host_chunk_bytes: usize,
    /// Split each physical node into this many pretend nodes, to exercise the multi-node
    /// hierarchy on one machine (`TPCOMM_FAKE_NODES`; 0 or 1 = off).
    pub fake_nodes: usize,
    /// Log each dispatch decision, the bootstrap summary and what `init_device` built, at info
    /// level through the `log` facade (`TPCOMM_DEBUG`).
    pub debug: bool,
    /// Make every eager device call wait for its result and report its own errors, instead of
    /// only enqueueing (`TPCOMM_SYNC_CALLS`; for debugging: it blocks the host on every call).
    pub sync_calls: bool,
    /// Launch the IPC kernels with programmatic dependent launch, so a call's launch overlaps
    /// the previous kernel of its stream (`TPCOMM_PDL`, on by default; sm_90 and newer, a no-op
    /// before). Measured on one H200: 4 KiB in graphs 3.24 -> 2.64 us at 2 ranks.
    pub pdl: bool,
    /// Where compiled kernels (CUBIN) are cached (`TPCOMM_CACHE_DIR`; `None` = `~/.cache/tpcomm`).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Largest device message (bytes per rank) the custom IPC allreduce serves through its
    /// staging and scratch buffers, which each rank allocates of this size
    /// (`TPCOMM_CUSTOM_MAX_BYTES`). Above it, calls whose buffers every peer reaches (registered
    /// or captured) take the direct two-shot where NCCL does not serve; others go in chunks.
    pub custom_max_bytes: usize,
    /// Most blocks of one custom one-/two-shot launch (`TPCOMM_CUSTOM_MAX_BLOCKS`, 1 to 128;
    /// blocks of 256 threads, 512 for the fused one-shot + RMSNorm; `None`: 72, the threads of
    /// the seed's 36 blocks of 512, and 128 for large calls: one-shot from 2 MiB, two-shot
    /// through scratch from 8 MiB; both two-shots take at most 32 below those sizes at 3-8
    /// ranks, the two-shot stored directly at every size there; the fused kernels at most 64),
    /// before the cap that keeps every rank's blocks resident on a shared GPU.
    pub custom_max_blocks: Option<usize>,
    /// Bytes of the largest message the packet kernels take; sizes each rank's LL scratch and
    /// Lamport buffers (about 6 x world x this) (`TPCOMM_PACKET_BUFFER_BYTES`).
    pub packet_buffer_bytes: usize,
    /// Data threads per block of the packet kernels (`TPCOMM_PACKET_THREADS`; `None`: 128 at 2
    /// ranks, 64 above).
    pub packet_threads: Option<usize>,
    /// Device messages up to this many bytes use LL packets (`TPCOMM_PACKET_MAX_BYTES`; `None`
    /// keeps the tuned or default value; capped by the packet buffer).
    pub packet_max_bytes: Option<usize>,
    /// Device messages up to this many bytes use one-shot, larger ones two-shot
    /// (`TPCOMM_ONESHOT_MAX_BYTES`; `None` keeps the tuned or default value).
    pub oneshot_max_bytes: Option<usize>,
    /// `all_reduce_add_rms_norm` fuses messages up to this many bytes
    /// (`TPCOMM_FUSED_NORM_MAX_BYTES`; `None` keeps the default, 2 MiB). Within it the fused
    /// one-shot takes up to 2 MiB at 2-4 ranks and 256 KiB at 5-8, the fused two-shot larger ones
    /// (and at 5-8 ranks in place rows of 16 KiB or more) where every peer reaches the input and
    /// norm_out (registered or captured buffers); other calls split.
    pub fused_norm_max_bytes: Option<usize>,
    /// A dispatch table tuned by [`crate::Communicator::tune`]: loaded at start when the file
    /// exists and was tuned for this machine and layout, written by `tune` (`TPCOMM_TUNE_FILE`).
    pub tune_file: Option<std::path::PathBuf>,
    /// Bitwise reproducible results (`TPCOMM_DETERMINISTIC`): every element is summed in
    /// absolute rank order whatever the message size, so the bits of element `i` depend only on
    /// the ranks' inputs at `i`. NCCL (whose ring and tree orders vary with size and layout) is
    /// never chosen; device messages over `TPCOMM_CUSTOM_MAX_BYTES` go through the custom kernels
    /// (one direct two-shot, or chunks) instead.
    pub deterministic: bool,
    /// Let the dispatch use the quantized allreduce with this codec for device messages of at
    /// least `quick_min_bytes` on one node (`TPCOMM_QUICK=off|fp8|int8|int6|int4`, default off).
    /// Results then differ from the exact sum within the codec's bound ([`crate::quant`]). Any
    /// codec builds the quick backend, so calls may also force another codec
    /// ([`crate::CallOptions::algo`]); off builds nothing. Deterministic mode never chooses it
    /// unless a call forces it.
    pub quick: Option<crate::quant::Codec>,
    /// Smallest device message (bytes per rank) the dispatch hands to the quick codec
    /// (`TPCOMM_QUICK_MIN_BYTES`; `None`: 1 MiB at 2 ranks, 2 MiB at 4, 4 MiB at 8, where
    /// QuickReduce measured quantization starting to pay over a real interconnect).
    pub quick_min_bytes: Option<usize>,
    /// Largest device message (bytes per rank) of the quick allreduce; each rank's inbox holds
    /// about 1.1 x this (`TPCOMM_QUICK_MAX_BYTES`).
    pub quick_max_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(30),
            algo: None,
            host_oneshot_max_bytes: None,
            host_chunk_bytes: 1 << 20,
            fake_nodes: 0,
            debug: false,
            sync_calls: false,
            pdl: true,
            cache_dir: None,
            custom_max_bytes: 8 << 20,
            custom_max_blocks: None,
            packet_buffer_bytes: 1 << 20,
            packet_threads: None,
            packet_max_bytes: None,
            oneshot_max_bytes: None,
            fused_norm_max_bytes: None,
            tune_file: None,
            deterministic: false,
            quick: None,
            quick_min_bytes: None,
            quick_max_bytes: 64 << 20,
        }
    }
}

/// One row of the parameter table.
struct Param {
    key: &'static str,
    help: &'static str,
    /// Parse a value into the configuration.
    set: fn(&mut Config, &str) -> std::result::Result<(), String>,
    /// Check the field's value (for environment strings and for configurations built in code
    /// alike): `Err(what is accepted)`.
    check: fn(&Config) -> std::result::Result<(), String>,
    show: fn(&Config) -> String,
    /// The setting only changes this rank (logging, cache location): ranks may differ in it.
    local: bool,
}

fn ok(_: &Config) -> std::result::Result<(), String> {
    Ok(())
}

fn parse_usize(v: &str) -> std::result::Result<usize, String> {
    let v = v.trim();
    let (digits, mult) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 1usize << 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|x| x.checked_mul(mult))
        .ok_or_else(|| "a non-negative integer, optionally with a K, M or G suffix".to_string())
}

fn parse_bool(v: &str) -> std::result::Result<bool, String> {
    match v.trim() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err("0 or 1".to_string()),
    }
}

const PARAMS: &[Param] = &[
    Param {
        key: "TPCOMM_TIMEOUT_MS",
        help: "milliseconds any wait on a peer (set-up included) may take before it is an error",
        set: |c, v| {
            c.timeout = Duration::from_millis(parse_usize(v)? as u64);
            Ok(())
        },
        check: |c| if c.timeout.is_zero() { Err("a positive number of milliseconds".into()) } else { Ok(()) },
        show: |c| c.timeout.as_millis().to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_ALGO",
        help: "force one algorithm (auto = dispatch table)",
        set: |c, v| {
            c.algo = match v.trim() {
                "auto" | "" => None,
                s => Some(s.parse::<Algo>()?),
            };
            Ok(())
        },
        check: ok,
        show: |c| c.algo.map_or("auto".to_string(), |a| a.as_str().to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_HOST_ONESHOT_MAX_BYTES",
        help: "largest host message (bytes) reduced one-shot; larger ones go two-shot",
        set: |c, v| {
            c.host_oneshot_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        check: ok,
        show: |c| c.host_oneshot_max_bytes.map_or("default".to_string(), |b| b.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_HOST_CHUNK_BYTES",
        help: "bytes per rank of each host shared-memory slot (larger messages go in chunks)",
        set: |c, v| {
            c.host_chunk_bytes = parse_usize(v)?;
            Ok(())
        },
        check: |c| {
            let b = c.host_chunk_bytes;
            if b < 4096 || b % 64 != 0 || b > (1 << 30) {
                return Err("a multiple of 64 between 4096 and 1G".into());
            }
            Ok(())
        },
        show: |c| c.host_chunk_bytes.to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_FAKE_NODES",
        help: "split each node into this many pretend nodes (tests the multi-node path)",
        set: |c, v| {
            c.fake_nodes = parse_usize(v)?;
            Ok(())
        },
        check: ok,
        show: |c| c.fake_nodes.to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_DEBUG",
        help: "1 logs the bootstrap summary, what init_device built and each dispatch decision (log facade, info)",
        set: |c, v| {
            c.debug = parse_bool(v)?;
            Ok(())
        },
        check: ok,
        show: |c| u8::from(c.debug).to_string(),
        local: true,
    },
    Param {
        key: "TPCOMM_SYNC_CALLS",
        help: "1 makes every eager device call wait for its result (debugging; blocks the host per call)",
        set: |c, v| {
            c.sync_calls = parse_bool(v)?;
            Ok(())
        },
        check: ok,
        show: |c| u8::from(c.sync_calls).to_string(),
        local: true,
    },
    Param {
        key: "TPCOMM_PDL",
        help: "1 (default) launches the IPC kernels with programmatic dependent launch (overlaps launches; sm_90+)",
        set: |c, v| {
            c.pdl = parse_bool(v)?;
            Ok(())
        },
        check: ok,
        show: |c| u8::from(c.pdl).to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_CACHE_DIR",
        help: "directory for compiled kernels (default ~/.cache/tpcomm)",
        set: |c, v| {
            let v = v.trim();
            c.cache_dir = (!v.is_empty()).then(|| std::path::PathBuf::from(v));
            if v.is_empty() {
                return Err("a directory path".into());
            }
            Ok(())
        },
        check: ok,
        show: |c| c.cache_dir.as_ref().map_or("default".to_string(), |d| d.display().to_string()),
        local: true,
    },
    Param {
        key: "TPCOMM_CUSTOM_MAX_BYTES",
        help: "largest device message (bytes) of one IPC kernel call; sizes their staging buffers",
        set: |c, v| {
            c.custom_max_bytes = parse_usize(v)?;
            Ok(())
        },
        check: |c| {
            let b = c.custom_max_bytes;
            if b < 4096 || b % 4096 != 0 || b > (1 << 34) {
                return Err("a multiple of 4096 between 4096 and 16G".into());
            }
            Ok(())
        },
        show: |c| c.custom_max_bytes.to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_PACKET_BUFFER_BYTES",
        help: "largest message (bytes) the packet kernels take; sizes their buffers (~7 x ranks x this)",
        set: |c, v| {
            c.packet_buffer_bytes = parse_usize(v)?;
            Ok(())
        },
        check: |c| {
            let b = c.packet_buffer_bytes;
            if b % 16 != 0 || b > (64 << 20) {
                return Err("a multiple of 16 up to 64M".into());
            }
            Ok(())
        },
        show: |c| c.packet_buffer_bytes.to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_CUSTOM_MAX_BLOCKS",
        help: "most blocks (of 256 threads) of one custom one-/two-shot launch (auto = 72), within what a shared GPU holds",
        set: |c, v| {
            c.custom_max_blocks = match v.trim() {
                "auto" | "" => None,
                s => Some(parse_usize(s)?),
            };
            Ok(())
        },
        check: |c| match c.custom_max_blocks {
            Some(b) if !(1..=crate::runtime::protocol::MAX_BLOCKS).contains(&b) => {
                Err(format!("auto or 1 to {}", crate::runtime::protocol::MAX_BLOCKS))
            }
            _ => Ok(()),
        },
        show: |c| c.custom_max_blocks.map_or("auto".to_string(), |b| b.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_PACKET_THREADS",
        help: "data threads per block of the packet kernels (auto = 128 at 2 ranks, 64 above)",
        set: |c, v| {
            c.packet_threads = match v.trim() {
                "auto" | "" => None,
                s => Some(parse_usize(s)?),
            };
            Ok(())
        },
        check: |c| match c.packet_threads {
            Some(t) if !(32..=256).contains(&t) || t % 32 != 0 => Err("auto or a multiple of 32 from 32 to 256".into()),
            _ => Ok(()),
        },
        show: |c| c.packet_threads.map_or("auto".to_string(), |t| t.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_PACKET_MAX_BYTES",
        help: "largest device message (bytes) reduced by LL packets; larger ones go one-shot",
        set: |c, v| {
            c.packet_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        check: ok,
        show: |c| c.packet_max_bytes.map_or("default".to_string(), |b| b.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_ONESHOT_MAX_BYTES",
        help: "largest device message (bytes) reduced one-shot; larger ones go two-shot",
        set: |c, v| {
            c.oneshot_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        check: ok,
        show: |c| c.oneshot_max_bytes.map_or("default".to_string(), |b| b.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_FUSED_NORM_MAX_BYTES",
        help: "largest message (bytes) all_reduce_add_rms_norm fuses; larger ones run the allreduce, then the norm",
        set: |c, v| {
            c.fused_norm_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        check: ok,
        show: |c| c.fused_norm_max_bytes.map_or("default".to_string(), |b| b.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_TUNE_FILE",
        help: "dispatch thresholds tuned for this machine: loaded if present, written by tune",
        set: |c, v| {
            let v = v.trim();
            if v.is_empty() {
                return Err("a file path".into());
            }
            c.tune_file = Some(std::path::PathBuf::from(v));
            Ok(())
        },
        check: ok,
        show: |c| c.tune_file.as_ref().map_or("none".to_string(), |d| d.display().to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_DETERMINISTIC",
        help: "1 keeps every sum in rank order (bitwise reproducible, never NCCL; large device messages in chunks)",
        set: |c, v| {
            c.deterministic = parse_bool(v)?;
            Ok(())
        },
        check: |c| match (c.deterministic, c.algo) {
            (true, Some(algo)) if !algo.sums_in_rank_order() && !algo.is_lossy() => Err(format!(
                "TPCOMM_ALGO={algo} cannot be combined with TPCOMM_DETERMINISTIC=1: {algo} does not sum in a fixed \
                 rank order; unset one of them"
            )),
            _ => Ok(()),
        },
        show: |c| u8::from(c.deterministic).to_string(),
        local: false,
    },
    Param {
        key: "TPCOMM_QUICK",
        help: "off (default), fp8, int8, int6 or int4: quantized allreduce above TPCOMM_QUICK_MIN_BYTES (lossy)",
        set: |c, v| {
            c.quick = match v.trim() {
                "off" | "0" | "" => None,
                s => Some(s.parse::<crate::quant::Codec>().map_err(|e| format!("off or {e}"))?),
            };
            Ok(())
        },
        check: ok,
        show: |c| c.quick.map_or("off".to_string(), |q| q.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_QUICK_MIN_BYTES",
        help: "smallest device message (bytes) the quick codec takes (default: the codec's, from measurement)",
        set: |c, v| {
            c.quick_min_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        check: ok,
        show: |c| c.quick_min_bytes.map_or("default".to_string(), |b| b.to_string()),
        local: false,
    },
    Param {
        key: "TPCOMM_QUICK_MAX_BYTES",
        help: "largest device message (bytes) of the quick allreduce; sizes its inboxes (~1.1 x this per rank)",
        set: |c, v| {
            c.quick_max_bytes = parse_usize(v)?;
            Ok(())
        },
        check: |c| {
            let b = c.quick_max_bytes;
            if b < 4096 || b % 4096 != 0 || b > (1 << 34) {
                return Err("a multiple of 4096 between 4096 and 16G".into());
            }
            Ok(())
        },
        show: |c| c.quick_max_bytes.to_string(),
        local: false,
    },
];
impl Config {
    /// Defaults overridden by every `TPCOMM_*` variable of the process environment.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown `TPCOMM_*` name or a value that does not parse.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// Defaults overridden by the `TPCOMM_*` pairs of `vars` (other names are skipped).
    ///
    /// # Errors
    /// As [`Config::from_env`].
    pub fn from_vars<K: AsRef<str>, V: AsRef<str>>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self> {
        let mut config = Config::default();
        for (key, value) in vars {
            let (key, value) = (key.as_ref(), value.as_ref());
            if !key.starts_with("TPCOMM_") {
                continue;
            }
            let Some(param) = PARAMS.iter().find(|p| p.key == key) else {
                let known: Vec<&str> = PARAMS.iter().map(|p| p.key).collect();
                return Err(Error::Config {
                    key: "TPCOMM_*",
                    value: format!("{key}={value}"),
                    expected: format!("one of the known variables {}", known.join(", ")),
                });
            };
            (param.set)(&mut config, value).map_err(|expected| Error::Config {
                key: param.key,
                value: value.to_string(),
                expected,
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Check every setting, as the environment's values are checked (a configuration built in
    /// code passes the same range checks), and settings that are valid alone but not together.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first setting that is out of range, or `TPCOMM_ALGO` when a
    /// forced algorithm that does not sum in rank order (NCCL) meets `TPCOMM_DETERMINISTIC=1`.
    pub fn validate(&self) -> Result<()> {
        for p in PARAMS {
            (p.check)(self).map_err(|expected| {
                let key = if p.key == "TPCOMM_DETERMINISTIC" { "TPCOMM_ALGO" } else { p.key };
                Error::Config { key, value: (p.show)(self), expected }
            })?;
        }
        Ok(())
    }

    /// Every parameter, its current value and its meaning, one per line.
    pub fn dump(&self) -> String {
        PARAMS.iter().map(|p| format!("{:<32} {:<10} {}\n", p.key, (p.show)(self), p.help)).collect()
    }

    /// The settings every rank must share (those that change the protocol), one per line.
    pub(crate) fn protocol_dump(&self) -> String {
        PARAMS.iter().filter(|p| !p.local).map(|p| format!("{}={}\n", p.key, (p.show)(self))).collect()
    }

    /// Where compiled kernels are cached.
    pub(crate) fn cache_dir(&self) -> std::path::PathBuf {
        self.cache_dir.clone().unwrap_or_else(crate::runtime::kernels::default_cache_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_variables() {
        let c = Config::from_vars([("PATH", "/bin")]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn values_are_parsed() {
        let c = Config::from_vars([
            ("TPCOMM_TIMEOUT_MS", "1500"),
            ("TPCOMM_ALGO", "host_twoshot"),
            ("TPCOMM_HOST_CHUNK_BYTES", "64K"),
            ("TPCOMM_HOST_ONESHOT_MAX_BYTES", "0"),
            ("TPCOMM_FAKE_NODES", "2"),
            ("TPCOMM_DEBUG", "1"),
            ("TPCOMM_CACHE_DIR", "/tmp/kc"),
            ("TPCOMM_CUSTOM_MAX_BYTES", "64M"),
        ])
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert_eq!(c.algo, Some(Algo::HostTwoShot));
        assert_eq!(c.host_chunk_bytes, 65536);
        assert_eq!(c.host_oneshot_max_bytes, Some(0));
        assert_eq!(c.fake_nodes, 2);
        assert!(c.debug);
        assert_eq!(c.cache_dir.as_deref(), Some(std::path::Path::new("/tmp/kc")));
        assert_eq!(c.custom_max_bytes, 64 << 20);
        let dump = c.dump();
        assert!(dump.contains("TPCOMM_ALGO") && dump.contains("host_twoshot"), "{dump}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_variable() {
        for (k, v) in [
            ("TPCOMM_TIMEOUT_MS", "soon"),
            ("TPCOMM_TIMEOUT_MS", "0"),
            ("TPCOMM_ALGO", "fastest"),
            ("TPCOMM_HOST_CHUNK_BYTES", "100"),
            ("TPCOMM_PACKET_THREADS", "0"),
            ("TPCOMM_PACKET_THREADS", "48"),
            ("TPCOMM_PACKET_THREADS", "512"),
            ("TPCOMM_PACKET_BUFFER_BYTES", "17"),
            ("TPCOMM_DEBUG", "maybe"),
            ("TPCOMM_CACHE_DIR", ""),
            ("TPCOMM_CUSTOM_MAX_BYTES", "1000"),
            ("TPCOMM_TIMEOUTMS", "10"),
            ("TPCOMM_DETERMINISTIC", "2"),
            ("TPCOMM_DETERMINISTIC", "maybe"),
            ("TPCOMM_QUICK", "int5"),
            ("TPCOMM_QUICK_MAX_BYTES", "100"),
            ("TPCOMM_QUICK_MIN_BYTES", "lots"),
        ] {
            let err = Config::from_vars([(k, v)]).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Config { .. }), "{k}={v}: {text}");
            assert!(text.contains(v), "{k}={v}: {text}");
        }
    }

    #[test]
    fn deterministic_values() {
        for (v, want) in [("1", true), ("on", true), ("true", true), ("0", false), ("off", false), ("no", false)] {
            assert_eq!(Config::from_vars([("TPCOMM_DETERMINISTIC", v)]).unwrap().deterministic, want, "{v}");
        }
        assert!(!Config::default().deterministic);
        let dump = Config { deterministic: true, ..Config::default() }.dump();
        assert!(dump.lines().any(|l| l.starts_with("TPCOMM_DETERMINISTIC") && l.contains(" 1 ")), "{dump}");
    }

    #[test]
    fn nccl_with_deterministic_is_refused_naming_both() {
        let err = Config::from_vars([("TPCOMM_ALGO", "nccl"), ("TPCOMM_DETERMINISTIC", "1")]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config { key: "TPCOMM_ALGO", .. }), "{text}");
        assert!(text.contains("TPCOMM_ALGO") && text.contains("TPCOMM_DETERMINISTIC"), "{text}");
        // Either alone is fine, and so is another forced algorithm with deterministic mode.
        assert_eq!(Config::from_vars([("TPCOMM_ALGO", "nccl")]).unwrap().algo, Some(Algo::Nccl));
        let c = Config::from_vars([("TPCOMM_ALGO", "twoshot"), ("TPCOMM_DETERMINISTIC", "1")]).unwrap();
        assert!(c.deterministic && c.algo == Some(Algo::TwoShot));
        // A configuration built in code is checked too, and the hierarchy (NCCL between nodes) likewise.
        assert!(Config { algo: Some(Algo::Nccl), deterministic: true, ..Config::default() }.validate().is_err());
        assert!(Config::from_vars([("TPCOMM_ALGO", "hier"), ("TPCOMM_DETERMINISTIC", "1")]).is_err());
        // A lossy codec asked for by name is reproducible bit for bit, so it may be forced.
        let c = Config::from_vars([("TPCOMM_ALGO", "quick_int8"), ("TPCOMM_DETERMINISTIC", "1")]).unwrap();
        assert_eq!(c.algo, Some(Algo::QuickInt8));
    }

    #[test]
    fn quick_is_off_unless_named() {
        assert_eq!(Config::default().quick, None);
        for (v, want) in
            [("off", None), ("fp8", Some(crate::quant::Codec::Fp8)), ("int4", Some(crate::quant::Codec::Int4))]
        {
            assert_eq!(Config::from_vars([("TPCOMM_QUICK", v)]).unwrap().quick, want, "{v}");
        }
        let err = Config::from_vars([("TPCOMM_QUICK", "int5")]).unwrap_err().to_string();
        assert!(err.contains("int8") && err.contains("off"), "{err}");
        let c = Config::from_vars([("TPCOMM_QUICK_MIN_BYTES", "2M"), ("TPCOMM_QUICK_MAX_BYTES", "16M")]).unwrap();
        assert_eq!((c.quick_min_bytes, c.quick_max_bytes), (Some(2 << 20), 16 << 20));
    }

    #[test]
    fn configurations_built_in_code_get_the_range_checks_of_the_environment() {
        for (bad, key) in [
            (Config { packet_threads: Some(48), ..Config::default() }, "TPCOMM_PACKET_THREADS"),
            (Config { custom_max_bytes: 1000, ..Config::default() }, "TPCOMM_CUSTOM_MAX_BYTES"),
            (Config { host_chunk_bytes: 100, ..Config::default() }, "TPCOMM_HOST_CHUNK_BYTES"),
            (Config { timeout: Duration::ZERO, ..Config::default() }, "TPCOMM_TIMEOUT_MS"),
        ] {
            match bad.validate() {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn only_protocol_settings_must_match_across_ranks() {
        let a = Config::default();
        let b = Config { debug: true, sync_calls: true, cache_dir: Some("/elsewhere".into()), ..a.clone() };
        assert_eq!(a.protocol_dump(), b.protocol_dump());
        assert_ne!(a.protocol_dump(), Config { custom_max_bytes: 1 << 20, ..a.clone() }.protocol_dump());
        assert_ne!(a.dump(), b.dump());
    }
}
