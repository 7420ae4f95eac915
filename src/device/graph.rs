//! Graph registration around the application's own graph capture (the seed's
//! `register_graph_buffers` flow): [`crate::Communicator::begin_graph_registration`], the
//! application's `begin_capture`, the allreduces (recorded, not run), its `end_capture`, then
//! [`GraphRegistration::finish`] with the graph (collective: addresses exchanged), and
//! [`RegisteredGraph::launch`] as often as needed. The crate documentation shows the flow on
//! CUDA; [`crate::Communicator::capture`] does all of it around a closure on either vendor.
//!
//! Calls captured outside a registration are refused ([`crate::Error::InvalidUsage`]); a
//! registered graph owns its graph, so it cannot be replayed after the rows its calls read
//! are freed; and every custom kernel checks that its row names its own input, so a graph
//! captured under a registration that was never finished fails its replays with an error instead
//! of reading what an unfilled row names.

use super::buffer::ReleaseQueue;
use crate::backend::RegId;
use crate::communicator::Communicator;
use crate::error::{Error, Result};
use crate::runtime::Graph;

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
    pub fn finish(mut self, graph: Option<Graph>) -> Result<RegisteredGraph> {
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

/// A graph whose captured allreduces are registered with every peer. Replay it with
/// [`RegisteredGraph::launch`]; dropping it frees what its calls held (rank-data rows). It may
/// outlive neither the communicator's device side nor the buffers its calls read.
pub struct RegisteredGraph {
    graph: Graph,
    reg: RegId,
    releases: ReleaseQueue,
}

impl RegisteredGraph {
    /// Replay the graph on the stream it was captured on (`cuGraphLaunch`, `hipGraphLaunch`). Errors of its calls
    /// are reported by [`Communicator::poll`], `synchronize` and the next call.
    ///
    /// # Errors
    /// The vendor's error ([`Error::Cuda`], [`Error::Hip`]) when the launch fails.
    pub fn launch(&self) -> Result<()> {
        crate::runtime::launch_graph(&self.graph)
    }

    /// The graph ([`crate::Graph`]: `CudaGraph` in the default build, `HipGraph` in a ROCm build), to launch it
    /// another way (for example inside a larger graph).
    pub fn graph(&self) -> &Graph {
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
