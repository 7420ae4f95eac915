//! Run-time configuration: one table of `TPCOMM_*` parameters.
//!
//! [`Config::from_env`] reads every variable whose name starts with `TPCOMM_`. A value tpcomm
//! cannot parse, or a `TPCOMM_*` name it does not know (a typo), is an error rather than being
//! ignored. [`Config::dump`] prints every parameter with its value and its meaning;
//! `allreduce_perf --show-config` shows it.

use crate::dispatch::Algo;
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
    /// Print each dispatch decision and the bootstrap summary on stderr (`TPCOMM_DEBUG`).
    pub debug: bool,
    /// Where compiled kernels (CUBIN) are cached (`TPCOMM_CACHE_DIR`; `None` = `~/.cache/tpcomm`).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Largest device message (bytes per rank) the custom IPC allreduce serves; each rank
    /// allocates a staging and a scratch buffer of this size (`TPCOMM_CUSTOM_MAX_BYTES`).
    pub custom_max_bytes: usize,
    /// Bytes of the largest message the packet kernels take; sizes each rank's LL scratch and
    /// Lamport buffers (about 7 x world x this) (`TPCOMM_PACKET_BUFFER_BYTES`).
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
    /// A dispatch table tuned by [`crate::Communicator::tune`]: loaded at start when the file
    /// exists and was tuned for this machine and layout, written by `tune` (`TPCOMM_TUNE_FILE`).
    pub tune_file: Option<std::path::PathBuf>,
    /// Bitwise reproducible results (`TPCOMM_DETERMINISTIC`): every element is summed in
    /// absolute rank order whatever the message size, so the bits of element `i` depend only on
    /// the ranks' inputs at `i`. NCCL (whose ring and tree orders vary with size and layout) is
    /// never chosen; device messages over `TPCOMM_CUSTOM_MAX_BYTES` go through the custom kernels
    /// in chunks instead.
    pub deterministic: bool,
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
            cache_dir: None,
            custom_max_bytes: 8 << 20,
            packet_buffer_bytes: 1 << 20,
            packet_threads: None,
            packet_max_bytes: None,
            oneshot_max_bytes: None,
            tune_file: None,
            deterministic: false,
        }
    }
}

/// One row of the parameter table.
struct Param {
    key: &'static str,
    help: &'static str,
    set: fn(&mut Config, &str) -> std::result::Result<(), String>,
    show: fn(&Config) -> String,
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
        help: "milliseconds any wait on a peer may take before it is an error",
        set: |c, v| {
            let ms = parse_usize(v)?;
            if ms == 0 {
                return Err("a positive number of milliseconds".into());
            }
            c.timeout = Duration::from_millis(ms as u64);
            Ok(())
        },
        show: |c| c.timeout.as_millis().to_string(),
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
        show: |c| c.algo.map_or("auto".to_string(), |a| a.as_str().to_string()),
    },
    Param {
        key: "TPCOMM_HOST_ONESHOT_MAX_BYTES",
        help: "largest host message (bytes) reduced one-shot; larger ones go two-shot",
        set: |c, v| {
            c.host_oneshot_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        show: |c| c.host_oneshot_max_bytes.map_or("default".to_string(), |b| b.to_string()),
    },
    Param {
        key: "TPCOMM_HOST_CHUNK_BYTES",
        help: "bytes per rank of each host shared-memory slot (larger messages go in chunks)",
        set: |c, v| {
            let b = parse_usize(v)?;
            if b < 4096 || b % 64 != 0 || b > (1 << 30) {
                return Err("a multiple of 64 between 4096 and 1G".into());
            }
            c.host_chunk_bytes = b;
            Ok(())
        },
        show: |c| c.host_chunk_bytes.to_string(),
    },
    Param {
        key: "TPCOMM_FAKE_NODES",
        help: "split each node into this many pretend nodes (tests the multi-node path)",
        set: |c, v| {
            c.fake_nodes = parse_usize(v)?;
            Ok(())
        },
        show: |c| c.fake_nodes.to_string(),
    },
    Param {
        key: "TPCOMM_DEBUG",
        help: "1 prints the bootstrap summary and each dispatch decision on stderr",
        set: |c, v| {
            c.debug = parse_bool(v)?;
            Ok(())
        },
        show: |c| u8::from(c.debug).to_string(),
    },
    Param {
        key: "TPCOMM_CACHE_DIR",
        help: "directory for compiled kernels (default ~/.cache/tpcomm)",
        set: |c, v| {
            let v = v.trim();
            if v.is_empty() {
                return Err("a directory path".into());
            }
            c.cache_dir = Some(std::path::PathBuf::from(v));
            Ok(())
        },
        show: |c| c.cache_dir.as_ref().map_or("default".to_string(), |d| d.display().to_string()),
    },
    Param {
        key: "TPCOMM_CUSTOM_MAX_BYTES",
        help: "largest device message (bytes) of the custom IPC allreduce; sizes its staging buffers",
        set: |c, v| {
            let b = parse_usize(v)?;
            if b < 4096 || b % 4096 != 0 || b > (1 << 34) {
                return Err("a multiple of 4096 between 4096 and 16G".into());
            }
            c.custom_max_bytes = b;
            Ok(())
        },
        show: |c| c.custom_max_bytes.to_string(),
    },
    Param {
        key: "TPCOMM_PACKET_BUFFER_BYTES",
        help: "largest message (bytes) the packet kernels take; sizes their buffers (~7 x ranks x this)",
        set: |c, v| {
            let b = parse_usize(v)?;
            if b % 16 != 0 || b > (64 << 20) {
                return Err("a multiple of 16 up to 64M".into());
            }
            c.packet_buffer_bytes = b;
            Ok(())
        },
        show: |c| c.packet_buffer_bytes.to_string(),
    },
    Param {
        key: "TPCOMM_PACKET_THREADS",
        help: "data threads per block of the packet kernels (auto = 128 at 2 ranks, 64 above)",
        set: |c, v| {
            c.packet_threads = match v.trim() {
                "auto" | "" => None,
                s => match parse_usize(s)? {
                    t @ 32..=256 if t % 32 == 0 => Some(t),
                    _ => return Err("auto or a multiple of 32 from 32 to 256".into()),
                },
            };
            Ok(())
        },
        show: |c| c.packet_threads.map_or("auto".to_string(), |t| t.to_string()),
    },
    Param {
        key: "TPCOMM_PACKET_MAX_BYTES",
        help: "largest device message (bytes) reduced by LL packets; larger ones go one-shot",
        set: |c, v| {
            c.packet_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        show: |c| c.packet_max_bytes.map_or("default".to_string(), |b| b.to_string()),
    },
    Param {
        key: "TPCOMM_ONESHOT_MAX_BYTES",
        help: "largest device message (bytes) reduced one-shot; larger ones go two-shot",
        set: |c, v| {
            c.oneshot_max_bytes = Some(parse_usize(v)?);
            Ok(())
        },
        show: |c| c.oneshot_max_bytes.map_or("default".to_string(), |b| b.to_string()),
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
        show: |c| c.tune_file.as_ref().map_or("none".to_string(), |d| d.display().to_string()),
    },
    Param {
        key: "TPCOMM_DETERMINISTIC",
        help: "1 keeps every sum in rank order (bitwise reproducible, never NCCL; large device messages in chunks)",
        set: |c, v| {
            c.deterministic = parse_bool(v)?;
            Ok(())
        },
        show: |c| u8::from(c.deterministic).to_string(),
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
                    key: "TPCOMM_* variable",
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

    /// Check settings that are valid alone but not together.
    ///
    /// # Errors
    /// [`Error::Config`] when `TPCOMM_ALGO=nccl` is combined with `TPCOMM_DETERMINISTIC=1`:
    /// NCCL's summation order is not fixed, so it cannot serve deterministic mode.
    pub fn validate(&self) -> Result<()> {
        if let (true, Some(algo @ (Algo::Nccl | Algo::Hierarchical))) = (self.deterministic, self.algo) {
            return Err(Error::Config {
                key: "TPCOMM_ALGO",
                value: algo.as_str().to_string(),
                expected: "another algorithm (or auto) while TPCOMM_DETERMINISTIC=1: NCCL does not sum in a fixed \
                           rank order; unset TPCOMM_ALGO or TPCOMM_DETERMINISTIC"
                    .into(),
            });
        }
        Ok(())
    }

    /// Every parameter, its current value and its meaning, one per line.
    pub fn dump(&self) -> String {
        PARAMS.iter().map(|p| format!("{:<32} {:<10} {}\n", p.key, (p.show)(self), p.help)).collect()
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
    }
}
