//! The MPI side of start-up: who is on which node, and byte exchange between ranks.
//!
//! [`Bootstrap::new`] works over any rsmpi communicator (the world or a split of it) and any
//! world size, including 1, odd sizes and ranks spread unevenly over nodes. It duplicates the
//! communicator so tpcomm's own messages never mix with the application's.
//!
//! Nodes are found with an MPI shared-memory split (`MPI_Comm_split_type(SHARED)`), and numbered
//! by their lowest rank, so node 0 holds rank 0. `TPCOMM_FAKE_NODES=k` further cuts each node
//! into `k` pretend nodes of consecutive local ranks, so the multi-node paths run on one machine.

use crate::error::{Error, Result};
use crate::topology;
use mpi::datatype::PartitionMut;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

/// Ranks, nodes and the maps between them, plus the communicators tpcomm talks over.
pub struct Bootstrap {
    world: SimpleCommunicator,
    node: SimpleCommunicator,
    /// This rank in the communicator.
    pub rank: usize,
    /// Ranks in the communicator.
    pub size: usize,
    /// This rank's index among the ranks of its node.
    pub local_rank: usize,
    /// Ranks on this rank's node.
    pub nranks_per_node: usize,
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

impl Bootstrap {
    /// Discover the layout of `comm`.
    ///
    /// # Collective
    /// Every rank of `comm` must call it.
    ///
    /// # Errors
    /// [`Error::Mpi`] when a split fails.
    pub fn new<C: Communicator>(comm: &C, fake_nodes: usize) -> Result<Self> {
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
        let nranks_per_node = node.size() as usize;

        // Lowest global rank of my node, gathered from everyone, names the nodes.
        let mut leader = rank as u64;
        node.process_at_rank(0).broadcast_into(&mut leader);
        let mut leaders = vec![0u64; size];
        world.all_gather_into(&leader, &mut leaders[..]);
        let mut distinct = leaders.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let rank_to_node: Vec<usize> =
            leaders.iter().map(|l| distinct.binary_search(l).expect("leader listed")).collect();
        let mut rank_to_local = vec![0u64; size];
        world.all_gather_into(&(local_rank as u64), &mut rank_to_local[..]);
        let ib = topology::nearest_network_device(local_rank) as u64;
        let mut rank_to_ib = vec![0u64; size];
        world.all_gather_into(&ib, &mut rank_to_ib[..]);

        Ok(Bootstrap {
            world,
            node,
            rank,
            size,
            local_rank,
            nranks_per_node,
            rank_to_node,
            rank_to_local: rank_to_local.into_iter().map(|x| x as usize).collect(),
            rank_to_ib: rank_to_ib.into_iter().map(|x| x as usize).collect(),
            nodes: distinct.len(),
        })
    }

    /// tpcomm's private duplicate of the communicator it was built over.
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// The ranks of this rank's node (or pretend node), ordered by global rank.
    pub fn node(&self) -> &SimpleCommunicator {
        &self.node
    }

    /// This rank's node index.
    pub fn node_index(&self) -> usize {
        self.rank_to_node[self.rank]
    }

    /// The smallest number of ranks on any node.
    pub fn min_ranks_per_node(&self) -> usize {
        (0..self.nodes).map(|n| self.rank_to_node.iter().filter(|&&m| m == n).count()).min().unwrap_or(0)
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
            self.nranks_per_node,
            self.rank_to_node,
            self.rank_to_ib
        )
    }
}

/// Gather one byte blob from every rank of `comm`; blobs may differ in length.
/// Returns them in rank order.
///
/// # Collective
/// Every rank of `comm` must call it.
pub fn all_gather_bytes<C: Communicator>(comm: &C, mine: &[u8]) -> Vec<Vec<u8>> {
    let n = comm.size() as usize;
    let mut counts = vec![0i32; n];
    comm.all_gather_into(&(mine.len() as i32), &mut counts[..]);
    let displs: Vec<i32> = counts
        .iter()
        .scan(0i32, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect();
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    if total == 0 {
        // Nothing to move: an empty buffer's dangling pointer is not a valid MPI argument.
        return vec![Vec::new(); n];
    }
    let mut all = vec![0u8; total];
    {
        let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
        comm.all_gather_varcount_into(mine, &mut part);
    }
    counts.iter().zip(&displs).map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec()).collect()
}

/// Broadcast a byte blob from `root` to every rank of `comm`; `blob` is overwritten on the
/// others (its length too).
///
/// # Collective
/// Every rank of `comm` must call it with the same `root`.
pub fn broadcast_bytes<C: Communicator>(comm: &C, root: usize, blob: &mut Vec<u8>) {
    let mut len = blob.len() as u64;
    comm.process_at_rank(root as i32).broadcast_into(&mut len);
    blob.resize(len as usize, 0);
    if len > 0 {
        // An empty buffer's dangling pointer is not a valid MPI argument: skip the empty case.
        comm.process_at_rank(root as i32).broadcast_into(&mut blob[..]);
    }
}

/// Make every rank of `comm` agree whether a step succeeded everywhere, so no rank goes on to
/// an exchange the others skip. Returns the local error where this rank failed, and
/// [`Error::Unsupported`] naming the step where only another rank did.
///
/// # Collective
/// Every rank of `comm`, after the same step.
pub fn agree<C: Communicator, T>(comm: &C, local: Result<T>, step: &str) -> Result<T> {
    use mpi::collective::SystemOperation;
    let ok = u8::from(local.is_ok());
    let mut all_ok = 0u8;
    comm.all_reduce_into(&ok, &mut all_ok, SystemOperation::min());
    match local {
        Err(e) => Err(e),
        Ok(_) if all_ok == 0 => Err(Error::Unsupported {
            what: step.to_string(),
            reason: "it failed on another rank (see that rank's error)".to_string(),
        }),
        Ok(v) => Ok(v),
    }
}
