//! The MPI side of start-up: who is on which node.
//!
//! [`Bootstrap::new`] works over any rsmpi communicator (the world or a split of it) and any
//! world size, including 1, odd sizes and ranks spread unevenly over nodes. It first waits, with
//! a bound, until every rank has arrived (so the blocking MPI calls that follow, which have no
//! non-blocking form, only run once everyone is there), then duplicates the communicator so
//! tpcomm's own messages never mix with the application's.
//!
//! Nodes are found with an MPI shared-memory split (`MPI_Comm_split_type(SHARED)`), and numbered
//! by their lowest rank, so node 0 holds rank 0. `TPCOMM_FAKE_NODES=k` further cuts each node
//! into `k` pretend nodes of consecutive local ranks, so the multi-node paths run on one machine.

use crate::error::{Error, Result};
use crate::exchange;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use std::time::Duration;

/// Where the ranks are: nodes, local ranks and the maps between them (the same on every rank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// This rank in the communicator.
    pub rank: usize,
    /// Ranks in the communicator.
    pub size: usize,
    /// This rank's index among the ranks of its node.
    pub local_rank: usize,
    /// Ranks on this rank's node.
    pub ranks_per_node: usize,
    /// Node index of every rank (nodes numbered by their lowest rank).
    pub rank_to_node: Vec<usize>,
    /// Local index of every rank on its node.
    pub rank_to_local: Vec<usize>,
    /// Per rank: the network device nearest its GPU (index into the sorted
    /// `/sys/class/infiniband` entries), or its local GPU index where there is no such device.
    pub rank_to_ib: Vec<usize>,
    /// Number of nodes.
    pub nodes: usize,
}

impl Layout {
    /// This rank's node index.
    pub fn node_index(&self) -> usize {
        self.rank_to_node[self.rank]
    }

    /// The smallest number of ranks on any node.
    pub fn min_ranks_per_node(&self) -> usize {
        (0..self.nodes).map(|n| self.ranks_on_node(n)).min().unwrap_or(0)
    }

    /// Ranks on node `n`.
    pub fn ranks_on_node(&self, n: usize) -> usize {
        self.rank_to_node.iter().filter(|&&m| m == n).count()
    }

    /// One line describing the layout, for logs.
    pub fn summary(&self) -> String {
        format!(
            "rank {}/{} node {}/{} local {}/{} rank_to_node {:?} rank_to_ib {:?}",
            self.rank,
            self.size,
            self.node_index(),
            self.nodes,
            self.local_rank,
            self.ranks_per_node,
            self.rank_to_node,
            self.rank_to_ib
        )
    }
}

/// The version of what ranks exchange (blob layouts, kernel protocols); ranks of different
/// versions refuse each other at start-up.
const PROTOCOL_VERSION: u64 = 2;

/// The layout plus the communicators tpcomm talks over.
pub(crate) struct Bootstrap {
    world: exchange::Comm,
    node: exchange::Comm,
    pub layout: Layout,
    /// The bound of every wait on a peer (`TPCOMM_TIMEOUT_MS`).
    pub timeout: Duration,
}

impl Bootstrap {
    /// Discover the layout of `comm`.
    ///
    /// # Collective
    /// Every rank of `comm` must call it.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] when a rank does not arrive within `timeout`; [`Error::Mpi`] when a
    /// split fails.
    pub(crate) fn new<C: Communicator>(comm: &C, fake_nodes: usize, timeout: Duration) -> Result<Self> {
        exchange::barrier(comm, timeout, "Communicator::new: waiting for every rank to arrive")?;
        // A second bounded exchange before the blocking calls: a rank that arrived after the
        // others gave up finds its barrier matched by their abandoned ones, and must time out
        // here rather than block in MPI_Comm_dup. It also refuses peers of another protocol.
        let versions =
            exchange::all_gather_u64(comm, PROTOCOL_VERSION, timeout, "Communicator::new: every rank present")?;
        if let Some(r) = versions.iter().position(|&v| v != PROTOCOL_VERSION) {
            return Err(Error::Mismatch {
                op: "Communicator::new",
                detail: format!("rank {r} runs tpcomm protocol {} and this rank {PROTOCOL_VERSION}", versions[r]),
            });
        }
        let world = comm.duplicate();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let shared = world.split_shared(rank as i32);
        let node = if fake_nodes > 1 {
            let local = shared.rank() as usize;
            let per = shared.size() as usize;
            // Consecutive local ranks share a pretend node; the first nodes get the extra ranks.
            let part = local * fake_nodes.min(per) / per;
            shared
                .split_by_color_with_key(Color::with_value(part as i32), rank as i32)
                .ok_or_else(|| Error::Mpi("fake-node split returned no communicator".into()))?
        } else {
            shared
        };
        let local_rank = node.rank() as usize;
        let ranks_per_node = node.size() as usize;

        // Lowest global rank of my node, gathered from everyone, names the nodes.
        let leaders = exchange::all_gather_u64(&world, node_leader(&node, rank, timeout)?, timeout, "bootstrap")?;
        let mut distinct = leaders.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let rank_to_node: Vec<usize> = leaders.iter().map(|l| distinct.partition_point(|d| d < l)).collect();
        let to_usize = |v: Vec<u64>| v.into_iter().map(|x| x as usize).collect::<Vec<_>>();
        let rank_to_local = to_usize(exchange::all_gather_u64(&world, local_rank as u64, timeout, "bootstrap")?);
        let ib = crate::topology::nearest_network_device(local_rank) as u64;
        let rank_to_ib = to_usize(exchange::all_gather_u64(&world, ib, timeout, "bootstrap")?);
        let layout = Layout {
            rank,
            size,
            local_rank,
            ranks_per_node,
            rank_to_node,
            rank_to_local,
            rank_to_ib,
            nodes: distinct.len(),
        };
        Ok(Bootstrap { world: exchange::Comm::new(world), node: exchange::Comm::new(node), layout, timeout })
    }

    /// tpcomm's private duplicate of the communicator it was built over.
    pub(crate) fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// The ranks of this rank's node (or pretend node), ordered by global rank.
    pub(crate) fn node(&self) -> &SimpleCommunicator {
        &self.node
    }

    /// The ranks of my local index on every node, in node order, for the local ranks that own a
    /// shard of the cross-node leg (`local_rank < min_ranks_per_node`); `None` for the others.
    ///
    /// # Collective
    /// Every rank of the world.
    pub(crate) fn cross_communicator(&self) -> Option<exchange::Comm> {
        let l = &self.layout;
        let color = if l.local_rank < l.min_ranks_per_node() {
            Color::with_value(l.local_rank as i32)
        } else {
            Color::undefined()
        };
        self.world.split_by_color_with_key(color, l.node_index() as i32).map(exchange::Comm::new)
    }
}

/// The lowest global rank of `node` (its local rank 0), on every rank of it.
fn node_leader(node: &SimpleCommunicator, rank: usize, timeout: Duration) -> Result<u64> {
    let mut blob = if node.rank() == 0 { (rank as u64).to_le_bytes().to_vec() } else { Vec::new() };
    exchange::broadcast_bytes(node, 0, &mut blob, timeout, "bootstrap: naming the node")?;
    let bytes: [u8; 8] = blob.as_slice().try_into().map_err(|_| Error::Mismatch {
        op: "bootstrap",
        detail: "local rank 0 sent a node name of another size (a peer running another version of tpcomm?)".into(),
    })?;
    Ok(u64::from_le_bytes(bytes))
}
