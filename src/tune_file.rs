//! Tuned dispatch tables on disk (`TPCOMM_TUNE_FILE`), apart from the policy that uses them.
//!
//! A file holds the thresholds [`crate::Communicator::tune`] measured and the [`TuneKey`] of the
//! machine and layout it measured them on. A table tuned elsewhere is refused, not silently
//! used. This is the one place that probes the machine (CPU model, GPU model).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::plan::DispatchTable;
use std::path::Path;

/// What a tuned table is valid for: the machine (CPU model, GPU model) and the layout (world
/// size, ranks per node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TuneKey(pub String);

impl TuneKey {
    /// The key of this machine for a layout: `ranks_per_node[i]` ranks on node `i`.
    pub(crate) fn new(world_size: usize, ranks_per_node: &[usize]) -> Self {
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

/// Read thresholds saved by [`save`] (the text of the file at `path`) into `table`, except those
/// the configuration set explicitly (`TPCOMM_*_MAX_BYTES` win over a tuned file).
///
/// # Errors
/// [`Error::Config`] when the text is malformed or was tuned for another machine or layout.
pub(crate) fn load(table: &mut DispatchTable, text: &str, path: &Path, key: &TuneKey, config: &Config) -> Result<()> {
    let bad = |expected: String| Error::Config { key: "TPCOMM_TUNE_FILE", value: path.display().to_string(), expected };
    let mut found_key = None;
    let (mut host, mut device, mut packet) = (None, None, None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line.split_once(' ').ok_or_else(|| bad(format!("\"name value\" lines, not {line:?}")))?;
        let number = || value.trim().parse::<usize>().map_err(|_| bad(format!("a number for {name}, not {value:?}")));
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
        table.host_oneshot_max_bytes = v;
    }
    if let (Some(v), None) = (device, config.oneshot_max_bytes) {
        table.oneshot_max_bytes = v;
    }
    if let (Some(v), None) = (packet, config.packet_max_bytes) {
        table.packet_max_bytes = v.min(config.packet_buffer_bytes);
    }
    Ok(())
}

/// Write the tuned thresholds of `table` to `path` under `key` (write then rename, so a reader
/// never sees half a file).
///
/// # Errors
/// [`Error::System`] when the file cannot be written.
pub(crate) fn save(table: &DispatchTable, path: &Path, key: &TuneKey) -> Result<()> {
    let text = format!(
        "# tpcomm dispatch table, tuned by Communicator::tune\nkey {}\nhost_oneshot_max_bytes {}\n\
         packet_max_bytes {}\noneshot_max_bytes {}\n",
        key.0, table.host_oneshot_max_bytes, table.packet_max_bytes, table.oneshot_max_bytes
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::System { op: format!("creating {}", dir.display()), source })?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| Error::System { op: format!("writing tuned dispatch table {}", path.display()), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuned_tables_round_trip_and_refuse_other_machines() {
        let dir = std::env::temp_dir().join(format!("tpcomm-tune-{}", std::process::id()));
        let path = dir.join("table.txt");
        let key = TuneKey("cpu=X gpu=none world=2 ranks_per_node=2".into());
        let mut tuned = DispatchTable::new(&Config::default(), 2);
        tuned.host_oneshot_max_bytes = 12345;
        tuned.oneshot_max_bytes = 777;
        tuned.packet_max_bytes = 96;
        save(&tuned, &path, &key).unwrap();
        let mut loaded = DispatchTable::new(&Config::default(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        load(&mut loaded, &text, &path, &key, &Config::default()).unwrap();
        assert_eq!(loaded, tuned);
        // An explicit environment override wins over the file.
        let config = Config { host_oneshot_max_bytes: Some(5), ..Config::default() };
        let mut overridden = DispatchTable::new(&config, 2);
        load(&mut overridden, &text, &path, &key, &config).unwrap();
        assert_eq!((overridden.host_oneshot_max_bytes, overridden.oneshot_max_bytes), (5, 777));
        let other = TuneKey("cpu=Y gpu=none world=2 ranks_per_node=2".into());
        let err =
            load(&mut DispatchTable::new(&Config::default(), 2), &text, &path, &other, &Config::default()).unwrap_err();
        assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("--autotune"), "{err}");
        let garbled = format!("key {}\nhost_oneshot_max_bytes lots\n", key.0);
        assert!(
            load(&mut DispatchTable::new(&Config::default(), 2), &garbled, &path, &key, &Config::default()).is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
