//! The [`Communicator`]: bootstraps over MPI, owns one object per backend, routes each call.

use crate::backend::host::HostAllreduce;
use crate::bootstrap::{all_gather_bytes, broadcast_bytes, Bootstrap};
use crate::config::Config;
use crate::dispatch::{Algo, DispatchTable, Memory, Request};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::hierarchy::CrossNode;
use crate::shm::ShmSegment;
use mpi::traits::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Segments made by this process, so two communicators never pick the same name.
static SEGMENTS: AtomicUsize = AtomicUsize::new(0);

/// Allreduce among the ranks of an MPI communicator.
///
/// Built collectively by [`Communicator::new`]. Calls on one communicator are serialised: they
/// take an internal lock, and every rank must make the same collective calls in the same order.
/// Use one communicator per thread or stream that issues collectives concurrently.
pub struct Communicator {
    boot: Bootstrap,
    config: Config,
    table: DispatchTable,
    state: Mutex<State>,
}

/// Everything that changes per call, behind the communicator's lock.
struct State {
    host: HostAllreduce,
    cross: Option<CrossNode>,
    poisoned: Option<String>,
}

impl Communicator {
    /// Bootstrap over `comm` (the world or any split of it) with `config`.
    ///
    /// # Collective
    /// Every rank of `comm`, with the same configuration.
    ///
    /// # Errors
    /// [`Error::System`] when the node's shared-memory segment cannot be made (for example a
    /// too small `/dev/shm`), [`Error::Mpi`] when a split fails.
    ///
    /// # Examples
    /// See `examples/hello_allreduce.rs`.
    pub fn new<C: mpi::traits::Communicator>(comm: &C, config: Config) -> Result<Self> {
        let boot = Bootstrap::new(comm, config.fake_nodes)?;
        check_same_config(&boot, &config)?;
        let host = open_host_segment(&boot, &config)?;
        let cross = if boot.nodes > 1 { Some(CrossNode::new(&boot)?) } else { None };
        if config.debug {
            eprintln!("tpcomm: {}", boot.summary());
        }
        let table = DispatchTable::new(&config, boot.size);
        Ok(Communicator { boot, config, table, state: Mutex::new(State { host, cross, poisoned: None }) })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.boot.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.boot.size
    }

    /// The layout found at bootstrap (nodes, local ranks, rank_to_node, rank_to_ib).
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.boot
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dispatch table in force.
    pub fn dispatch_table(&self) -> &DispatchTable {
        &self.table
    }

    /// The algorithm the dispatch table picks for a host call of `len` elements of `T`.
    ///
    /// # Errors
    /// As [`DispatchTable::choose`].
    pub fn host_algo<T: Element>(&self, len: usize) -> Result<Algo> {
        self.table.choose(&Request {
            bytes: len * size_of::<T>(),
            dtype: T::DTYPE,
            world_size: self.boot.size,
            nodes: self.boot.nodes,
            memory: Memory::Host,
        })
    }

    /// Sum `input` over all ranks into `output` (host memory).
    ///
    /// # Collective
    /// Every rank, same length and element type.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `input` and `output` differ in length (peers then see
    /// [`Error::PeerTimeout`]), [`Error::Mismatch`] when ranks pass different lengths,
    /// [`Error::PeerTimeout`] when a peer does not call within `TPCOMM_TIMEOUT_MS`.
    ///
    /// # Examples
    /// See `examples/hello_allreduce.rs`.
    pub fn all_reduce_host<T: Element>(&self, input: &[T], output: &mut [T]) -> Result<()> {
        let algo = self.host_algo::<T>(output.len())?;
        self.all_reduce_host_using(algo, Some(input), output)
    }

    /// Sum `buf` over all ranks, in place (host memory).
    ///
    /// # Collective
    /// As [`Communicator::all_reduce_host`].
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_host`].
    pub fn all_reduce_host_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let algo = self.host_algo::<T>(buf.len())?;
        self.all_reduce_host_using(algo, None, buf)
    }

    /// Host allreduce with an explicit algorithm (`input = None`: in place). For benchmarks and
    /// tests; [`Communicator::all_reduce_host`] asks the dispatch table instead.
    ///
    /// # Collective
    /// Every rank, same length, element type and algorithm.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_host`]; [`Error::Unsupported`] for a non-host algorithm.
    pub fn all_reduce_host_using<T: Element>(&self, algo: Algo, input: Option<&[T]>, output: &mut [T]) -> Result<()> {
        if algo.memory() != Memory::Host {
            return Err(Error::Unsupported {
                what: format!("algorithm {algo} on host memory"),
                reason: "pick a host_* algorithm".into(),
            });
        }
        if let Some(input) = input {
            if input.len() != output.len() {
                return Err(Error::invalid(
                    "all_reduce_host",
                    format!("input has {} elements but output has {}", input.len(), output.len()),
                ));
            }
        }
        let mut state = self.state.lock().map_err(|_| Error::Poisoned { cause: "a call panicked".into() })?;
        if let Some(cause) = &state.poisoned {
            return Err(Error::Poisoned { cause: cause.clone() });
        }
        if self.config.debug && self.boot.rank == 0 {
            eprintln!("tpcomm: host allreduce {} x {} -> {algo}", output.len(), T::DTYPE);
        }
        let result = state.run(algo, input, output, self.config.timeout);
        if let Err(e) = &result {
            if e.desynchronizes() && state.poisoned.is_none() {
                state.poisoned = Some(e.to_string());
            }
        }
        result
    }
}

impl State {
    fn run<T: Element>(
        &mut self,
        algo: Algo,
        input: Option<&[T]>,
        output: &mut [T],
        timeout: std::time::Duration,
    ) -> Result<()> {
        self.host.all_reduce(input, output, algo)?;
        let Some(cross) = &self.cross else { return Ok(()) };
        let len = output.len();
        cross.sum_across_nodes(&mut output[cross.my_shard(len)], timeout)?;
        self.host.all_gather_ranges(output, &cross.shard_ranges(len))
    }
}

/// Every rank must run with the same configuration (differing chunk sizes or algorithms would
/// make ranks disagree about shared memory). Every rank compares every configuration with rank
/// 0's, so all of them fail together and name the same rank.
fn check_same_config(boot: &Bootstrap, config: &Config) -> Result<()> {
    let all = all_gather_bytes(boot.world(), config.dump().as_bytes());
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        if *theirs != all[0] {
            let (a, b) = (String::from_utf8_lossy(&all[0]), String::from_utf8_lossy(theirs));
            let differs: Vec<String> = a
                .lines()
                .zip(b.lines())
                .filter(|(x, y)| x != y)
                .map(|(x, y)| format!("rank 0: {} / rank {rank}: {}", x.trim_end(), y.trim_end()))
                .collect();
            return Err(Error::Mismatch {
                op: "Communicator::new",
                detail: format!("ranks run with different TPCOMM_* settings: {}", differs.join("; ")),
            });
        }
    }
    Ok(())
}

/// Local rank 0 creates the node's segment and broadcasts its name; the others open it; after
/// a node barrier the name is unlinked, so nothing outlives the job.
fn open_host_segment(boot: &Bootstrap, config: &Config) -> Result<HostAllreduce> {
    let node = boot.node();
    let n = boot.nranks_per_node;
    let bytes = HostAllreduce::segment_bytes(n, config.host_chunk_bytes);
    let mut name = Vec::new();
    let mut created = None;
    let mut failure = None;
    if boot.local_rank == 0 {
        let candidate = format!(
            "/tpcomm.{}.{}.{}",
            std::process::id(),
            SEGMENTS.fetch_add(1, Ordering::Relaxed),
            boot.node_index()
        );
        match ShmSegment::create(&candidate, bytes) {
            Ok(seg) => {
                name = candidate.into_bytes();
                created = Some(seg);
            }
            Err(e) => failure = Some(e),
        }
    }
    broadcast_bytes(node, 0, &mut name);
    if name.is_empty() {
        return Err(failure.unwrap_or_else(|| Error::System {
            op: format!("creating the node's shared-memory segment of {bytes} bytes on local rank 0"),
            source: std::io::Error::other("failed on local rank 0; see its error"),
        }));
    }
    let opened = match created {
        Some(seg) => Ok(seg),
        None => ShmSegment::open(std::str::from_utf8(&name).expect("ascii name"), bytes),
    };
    // Everyone has tried to open before the name goes away.
    let ok = opened.is_ok() as u8;
    let mut all_ok = 0u8;
    node.all_reduce_into(&ok, &mut all_ok, mpi::collective::SystemOperation::min());
    let seg = opened?;
    if boot.local_rank == 0 {
        seg.unlink()?;
    }
    if all_ok == 0 {
        return Err(Error::System {
            op: format!("opening shared-memory segment {}", seg.name()),
            source: std::io::Error::other("another rank of this node could not open it"),
        });
    }
    let global_ranks: Vec<usize> = (0..boot.size).filter(|&r| boot.rank_to_node[r] == boot.node_index()).collect();
    HostAllreduce::new(seg, boot.local_rank, global_ranks, config.host_chunk_bytes, config.timeout)
}
