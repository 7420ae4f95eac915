//! Graph registration around the application's own CUDA graph capture (the seed's
//! `register_graph_buffers` flow).
//!
//! ```no_run
//! # fn step(comm: &tpcomm::Communicator, s: &std::sync::Arc<tpcomm::cudarc::driver::CudaStream>,
//! #         x: &tpcomm::DeviceBuffer<tpcomm::bf16>, y: &mut tpcomm::cudarc::driver::CudaSlice<tpcomm::bf16>)
//! #         -> tpcomm::Result<()> {
//! use tpcomm::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
//! let reg = comm.begin_graph_registration()?;          // local
//! s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
//! comm.all_reduce(x, y, s)?;                            // recorded, not run
//! let graph = s.end_capture(CUgraphInstantiate_flags(0)).ok().flatten();
//! let graph = reg.finish(graph)?;                       // collective: addresses exchanged
//! graph.launch()?;                                      // replay as often as needed
//! # Ok(()) }
//! ```
//!
//! Calls captured outside a registration are refused ([`crate::Error::InvalidUsage`]); a
//! registered graph owns its CUDA graph, so it cannot be replayed after the rows its calls read
//! are freed; and every custom kernel checks that its row names its own input, so a graph
//! captured under a registration that was never finished fails its replays with an error instead
//! of reading what an unfilled row names.

use super::buffer::ReleaseQueue;
use crate::backend::RegId;
use crate::communicator::Communicator;
use crate::error::{Error, Result};
use cudarc::driver::CudaGraph;

/// An open registration: the calls captured until [`GraphRegistration::finish`] belong to it.
/// Made by [`Communicator::begin_graph_registration`]. Dropping it without finishing abandons
/// it (the graph's calls then fail their replays, and the peers' `finish` times out).
#[must_use = "finish the registration after capture, or its graph's calls fail their replays"]
pub struct GraphRegistration<'c> {
    comm: &'c Communicator,
    reg: RegId,
    done: bool,
}

impl<'c> GraphRegistration<'c> {
    pub(crate) fn new(comm: &'c Communicator, reg: RegId) -> Self {
        GraphRegistration { comm, reg, done: false }
    }

    /// End the registration after capture: every rank learns the addresses its peers' captured
    /// calls read, and the graph becomes replayable. Pass what the capture produced (`None`
    /// where capture failed on this rank: every rank then gets an error, none waits).
    ///
    /// # Collective
    /// Every rank, after capturing the same allreduce calls in the same order.
    ///
    /// # Errors
    /// [`Error::PeerFailed`] when capture failed on another rank; [`Error::InvalidUsage`] for a
    /// failed capture here; [`Error::Mismatch`] when ranks captured different calls (do not
    /// replay); [`Error::PeerTimeout`].
    pub fn finish(mut self, graph: Option<CudaGraph>) -> Result<RegisteredGraph> {
        self.done = true;
        let captured = match &graph {
            Some(_) => Ok(()),
            None => Err(Error::usage("GraphRegistration::finish", "the capture produced no graph on this rank")),
        };
        let releases = self.comm.finish_registration(self.reg, captured)?;
        let graph = graph.ok_or_else(|| Error::Internal("finished a registration without its graph".into()))?;
        Ok(RegisteredGraph { graph, reg: self.reg, releases })
    }
}

impl Drop for GraphRegistration<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.comm.abandon_registration(self.reg);
        }
    }
}

/// A CUDA graph whose captured allreduces are registered with every peer. Replay it with
/// [`RegisteredGraph::launch`]; dropping it frees what its calls held (rank-data rows). It may
/// outlive neither the communicator's device side nor the buffers its calls read.
pub struct RegisteredGraph {
    graph: CudaGraph,
    reg: RegId,
    releases: ReleaseQueue,
}

impl RegisteredGraph {
    /// Replay the graph on the stream it was captured on (`cuGraphLaunch`). Errors of its calls
    /// are reported by [`Communicator::poll`], `synchronize` and the next call.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the launch fails.
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(crate::runtime::cuda("cuGraphLaunch"))
    }

    /// The CUDA graph, to launch it another way (for example inside a larger graph).
    pub fn graph(&self) -> &CudaGraph {
        &self.graph
    }
}

impl std::fmt::Debug for RegisteredGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegisteredGraph(registration {})", self.reg)
    }
}

impl Drop for RegisteredGraph {
    fn drop(&mut self) {
        // The graph itself is destroyed right after this (field drop); its rows are freed at the
        // communicator's next call, once the device finished any replay still in flight.
        self.releases.lock().unwrap_or_else(|e| e.into_inner()).graphs.push(self.reg);
    }
}
