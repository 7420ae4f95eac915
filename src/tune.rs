//! Tuning: time the candidate algorithms on this machine and move the dispatch thresholds to
//! the measured crossovers. It drives the communicator through its own public calls (forced
//! algorithms, graphs), so it sits above the face; the tuned file's format is `tune_file.rs`.
//!
//! Every timing is the maximum over ranks (a collective call is as slow as its slowest rank), so
//! every rank computes the same crossover from the same numbers, and a failure on any rank ends
//! tuning on all of them.

use crate::algo::Algo;
use crate::bootstrap::Bootstrap;
use crate::communicator::{CallOptions, Communicator};
use crate::error::{Error, Result};
use crate::exchange;
use crate::plan::{crossover, DispatchTable};
use crate::tune_file::TuneKey;
use std::time::Instant;

/// What a tuned table of this communicator must have been tuned for.
pub(crate) fn tune_key(boot: &Bootstrap) -> TuneKey {
    let l = &boot.layout;
    let per_node: Vec<usize> = (0..l.nodes).map(|n| l.ranks_on_node(n)).collect();
    TuneKey::new(l.size, &per_node)
}

/// Tunes the host one-shot limit and, where the device side is up, on one node with the IPC
/// kernels, the device packet and one-shot limits (bf16, registered input, CUDA graphs of 10
/// calls). Thresholds set through `TPCOMM_*_MAX_BYTES` are kept.
///
/// # Collective
/// Every rank, with no other call in flight.
pub(crate) fn tune(comm: &Communicator) -> Result<DispatchTable> {
    let host = tune_host(comm)?;
    let device = tune_device(comm)?;
    let config = comm.config();
    let mut table = comm.dispatch_table();
    if config.host_oneshot_max_bytes.is_none() {
        table.host_oneshot_max_bytes = host;
    }
    if let (Some((_, limit)), None) = (device, config.oneshot_max_bytes) {
        table.oneshot_max_bytes = limit;
    }
    if let (Some((limit, _)), None) = (device, config.packet_max_bytes) {
        table.packet_max_bytes = limit.min(config.packet_buffer_bytes);
    }
    if let (Some(path), 0) = (&config.tune_file, comm.rank()) {
        crate::tune_file::save(&table, path, &tune_key(comm.boot()))?;
    }
    comm.set_table(table.clone());
    Ok(table)
}

/// A rank's test input: nonzero, varied, cheap to make (its values do not matter for timing).
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + rank * 3) % 13) as f32 - 6.5).collect()
}

/// Host one-shot against two-shot, 4 KiB to 4 MiB, median of 20 calls each.
fn tune_host(comm: &Communicator) -> Result<usize> {
    let sizes: Vec<usize> = (12..=22).map(|p| 1usize << p).collect();
    let largest = sizes[sizes.len() - 1] / 4;
    let x = input(comm.rank(), largest);
    let mut y = vec![0.0f32; largest];
    let boot = comm.boot();
    measure_crossover(comm, &sizes, [Algo::HostOneShot, Algo::HostTwoShot], |algo, bytes| {
        let mut samples = Vec::new();
        for rep in 0..23 {
            exchange::barrier(boot.world(), boot.timeout, "tuning")?;
            let t = Instant::now();
            comm.all_reduce_host_with(&CallOptions::algo(algo), Some(&x[..bytes / 4]), &mut y[..bytes / 4])?;
            if rep >= 3 {
                samples.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(median(samples))
    })
}

/// Device one-shot against two-shot and packets against one-shot (bf16, registered input), each
/// timed as CUDA-graph replays of 10 calls. `None` unless the device side is up on every rank,
/// with the IPC kernels, on one node of several ranks.
fn tune_device(comm: &Communicator) -> Result<Option<(usize, usize)>> {
    let boot = comm.boot();
    let up = u64::from(comm.context().is_ok() && comm.device_algo::<half::bf16>(4096).is_ok());
    let everyone = exchange::all_min_u64(boot.world(), up, boot.timeout, "tuning")?;
    let ipc = everyone == 1 && comm.device_algo::<half::bf16>(8192).is_ok_and(|a| a != Algo::Nccl);
    if !ipc || boot.layout.nodes > 1 || boot.layout.size == 1 {
        return Ok(None);
    }
    let ctx = comm.context()?;
    let stream = ctx.new_stream()?;
    let max = comm.config().custom_max_bytes;
    let sizes: Vec<usize> = (12..=34).map(|p| 1usize << p).take_while(|&b| b <= max).collect();
    let len = max / 2;
    let mut x = comm.alloc_shared::<half::bf16>(len)?;
    let mut y = stream.alloc_zeros::<half::bf16>(len)?;
    let data: Vec<half::bf16> = input(comm.rank(), len).into_iter().map(half::bf16::from_f32).collect();
    stream.memcpy_htod(&data, &mut x)?;
    let mut time = |algo: Algo, bytes: usize| -> Result<f64> {
        let n = bytes / 2;
        let opts = CallOptions { algo: Some(algo), registered_only: true, ..CallOptions::default() };
        let graph = comm.capture(&stream, |s| {
            (0..10).try_for_each(|_| comm.all_reduce_with(&opts, &x.slice(0..n), &mut y.slice_mut(0..n), s))
        })?;
        graph.launch()?;
        comm.synchronize(&stream)?;
        let mut samples = Vec::new();
        for _ in 0..11 {
            exchange::barrier(boot.world(), boot.timeout, "tuning")?;
            let t = Instant::now();
            graph.launch()?;
            comm.synchronize(&stream)?;
            samples.push(t.elapsed().as_secs_f64() / 10.0);
        }
        Ok(median(samples))
    };
    let oneshot = measure_crossover(comm, &sizes, [Algo::OneShot, Algo::TwoShot], &mut time)?;
    let packet_top = comm.config().packet_buffer_bytes.min(512 << 10);
    let small: Vec<usize> = sizes.iter().copied().filter(|&b| b <= packet_top).collect();
    let packet = measure_crossover(comm, &small, [Algo::Lamport, Algo::OneShot], &mut time)?;
    Ok(Some((packet, oneshot)))
}

/// Time `candidates[0]` against `candidates[1]` at every size (`time` gives this rank's
/// seconds per call), take the maximum over ranks, and return the crossover.
///
/// # Collective
/// Every rank, same sizes and candidates.
fn measure_crossover(
    comm: &Communicator,
    sizes: &[usize],
    candidates: [Algo; 2],
    mut time: impl FnMut(Algo, usize) -> Result<f64>,
) -> Result<usize> {
    let boot = comm.boot();
    let mut times = [Vec::new(), Vec::new()];
    for &bytes in sizes {
        for (i, algo) in candidates.into_iter().enumerate() {
            // Every rank learns whether any rank failed, so none waits for the others in the
            // next collective while they return.
            let result = time(algo, bytes);
            let failed =
                exchange::all_max_f64(boot.world(), f64::from(u8::from(result.is_err())), boot.timeout, "tuning")?;
            if failed > 0.0 {
                return Err(result
                    .err()
                    .unwrap_or_else(|| Error::PeerFailed { step: format!("tuning {algo} at {bytes} bytes") }));
            }
            let worst = exchange::all_max_f64(boot.world(), *result.as_ref().unwrap_or(&0.0), boot.timeout, "tuning")?;
            times[i].push(worst);
        }
    }
    Ok(crossover(sizes, &times[0], &times[1]))
}

/// The median of some samples (the upper one of an even count).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}
