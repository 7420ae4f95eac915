//! The plan for messages that span nodes: reduce on each node, sum across nodes, share on
//! each node.
//!
//! 1. Every node reduces the whole message among its own ranks (node-local backend).
//! 2. The message is cut into `m` shards, `m` = the fewest ranks on any node. Local rank `l < m`
//!    of every node owns shard `l` and exchanges it with the ranks of local index `l` on the
//!    other nodes (MPI point-to-point, every wait bounded), then sums the node partials in node
//!    order in the accumulator and rounds once. Ranks spread unevenly over nodes are fine: local
//!    ranks `>= m` own no shard.
//! 3. Every node gathers the shards among its ranks (node-local backend).
//!
//! Every rank gets the same bits: node partials are summed in absolute rank order within the
//! node, then across nodes in node order ([`hierarchical_reference`] computes exactly this).

use crate::bootstrap::Bootstrap;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::exchange::MpiBuf;
use mpi::request::StaticScope;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::ops::Range;
use std::time::Duration;

/// Largest piece sent in one MPI message (MPI counts are 32-bit).
const MAX_MESSAGE_BYTES: usize = 1 << 30;
/// Tag of the shard exchange on tpcomm's private communicator.
const TAG_SHARD: i32 = 0x7c01;

/// The cross-node leg of one rank.
pub(crate) struct CrossNode {
    /// Ranks with my local index on the other nodes (None when I own no shard).
    comm: Option<crate::exchange::Comm>,
    /// Global rank of every member of `comm`, in node order.
    members: Vec<usize>,
    shards: usize,
    local_rank: usize,
    local_size: usize,
}

impl CrossNode {
    /// Build the cross-node communicators.
    ///
    /// # Collective
    /// Every rank of the bootstrap's communicator.
    ///
    /// # Errors
    /// [`Error::PeerTimeout`] when a rank does not arrive within the timeout.
    pub(crate) fn new(boot: &Bootstrap) -> Result<Self> {
        let l = &boot.layout;
        crate::exchange::barrier(boot.world(), boot.timeout, "building the cross-node communicators")?;
        let comm = boot.cross_communicator();
        let members = match &comm {
            Some(c) => crate::exchange::all_gather_u64(&**c, l.rank as u64, boot.timeout, "cross-node members")?
                .into_iter()
                .map(|r| r as usize)
                .collect(),
            None => Vec::new(),
        };
        let shards = l.min_ranks_per_node();
        Ok(CrossNode { comm, members, shards, local_rank: l.local_rank, local_size: l.ranks_per_node })
    }

    /// The shard of every local rank of my node for a message of `len` elements (empty for
    /// local ranks that own none).
    pub(crate) fn shard_ranges(&self, len: usize) -> Vec<Range<usize>> {
        shard_ranges(len, self.shards, self.local_size)
    }

    /// My shard of a message of `len` elements.
    pub(crate) fn my_shard(&self, len: usize) -> Range<usize> {
        self.shard_ranges(len)[self.local_rank].clone()
    }

    /// Replace `shard` (this node's partial sums) by the sum over nodes, in node order.
    ///
    /// # Collective
    /// Every rank that owns a shard, with equal shard lengths per local index.
    pub(crate) fn sum_across_nodes<T: Element>(&self, shard: &mut [T], timeout: Duration) -> Result<()> {
        let Some(comm) = &self.comm else { return Ok(()) };
        let nodes = self.members.len();
        if nodes == 1 {
            return Ok(());
        }
        // Descriptor first: a peer with another length or dtype is an error, not a bad MPI message.
        let mine = [shard.len() as u64, T::DTYPE.code() as u64];
        let descs = exchange(comm, &self.members, slice_bytes(&mine), timeout)?;
        for (node, d) in descs.iter().enumerate() {
            if d[..] != *slice_bytes(&mine) {
                let word = |i: usize| {
                    d.get(i * 8..i * 8 + 8).map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
                };
                return Err(Error::Mismatch {
                    op: "cross-node allreduce",
                    detail: format!(
                        "rank {} has a shard of {} elements of {}, this rank {} of {}",
                        self.members[node],
                        word(0),
                        DType::from_code(word(1) as u32).map_or("an unknown dtype", DType::as_str),
                        shard.len(),
                        T::DTYPE
                    ),
                });
            }
        }
        let per = (MAX_MESSAGE_BYTES / size_of::<T>()).max(1);
        for piece in shard.chunks_mut(per) {
            let partials = exchange(comm, &self.members, slice_bytes(piece), timeout)?;
            for (i, out) in piece.iter_mut().enumerate() {
                let mut acc = T::Acc::default();
                for (node, p) in partials.iter().enumerate() {
                    // SAFETY: every partial has piece.len() elements of T (checked descriptor).
                    let x = unsafe { (p.as_ptr() as *const T).add(i).read_unaligned() }.to_acc();
                    if node == 0 {
                        acc = x;
                    } else {
                        acc += x;
                    }
                }
                *out = T::from_acc(acc);
            }
        }
        Ok(())
    }
}

/// The shard of every local rank of a node of `local_size` ranks for a message of `len`
/// elements cut into `shards` pieces (empty for local ranks that own none).
pub(crate) fn shard_ranges(len: usize, shards: usize, local_size: usize) -> Vec<Range<usize>> {
    (0..local_size).map(|l| if l < shards { split(len, shards, l) } else { len..len }).collect()
}

/// The bytes of plain integers or floats (no padding).
fn slice_bytes<T: crate::dtype::Pod>(x: &[T]) -> &[u8] {
    // SAFETY: plain-old-data view of the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// `len` elements cut into `parts` contiguous ranges, the remainder spread over the first ones.
fn split(len: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Every member sends `mine` to every other member; returns all blobs in member order. Waits are
/// bounded: a member that does not answer within `timeout` is named in the error. On timeout
/// the buffers stay leaked on purpose (MPI may still write to them), and the caller poisons.
fn exchange(comm: &SimpleCommunicator, members: &[usize], mine: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>> {
    let me = comm.rank() as usize;
    let n = members.len();
    let send = MpiBuf::new(mine.to_vec().into_boxed_slice());
    let mut recvs: Vec<(usize, MpiBuf<[u8]>)> =
        (0..n).filter(|&q| q != me).map(|q| (q, MpiBuf::new(vec![0u8; mine.len()].into_boxed_slice()))).collect();
    let mut requests = Vec::new();
    let mut peer_of = Vec::new();
    for (q, buf) in recvs.iter_mut() {
        let p = comm.process_at_rank(*q as i32);
        requests.push(p.immediate_receive_into_with_tag(StaticScope, buf.exclusive(), TAG_SHARD));
        peer_of.push(*q);
        requests.push(p.immediate_send_with_tag(StaticScope, send.shared(), TAG_SHARD));
        peer_of.push(*q);
    }
    crate::exchange::wait_all(requests, |i| peer_of.get(i).map(|&q| members[q]), timeout, "cross-node allreduce")?;
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
    out[me] = send.take().into_vec();
    for (q, buf) in recvs {
        out[q] = buf.take().into_vec();
    }
    Ok(out)
}

/// The bits a hierarchical allreduce must produce: per node, the rank-order sum rounded to `T`;
/// then over nodes in node order in the accumulator, rounded once. `rank_to_node[r]` is the node
/// of rank `r`; nodes are numbered by their lowest rank.
pub fn hierarchical_reference<T: Element>(inputs: &[&[T]], rank_to_node: &[usize]) -> Vec<T> {
    let nodes = rank_to_node.iter().max().map_or(0, |m| m + 1);
    let partials: Vec<Vec<T>> = (0..nodes)
        .map(|node| {
            let members: Vec<&[T]> =
                inputs.iter().zip(rank_to_node).filter(|(_, &n)| n == node).map(|(x, _)| *x).collect();
            crate::dtype::reference_sum(&members)
        })
        .collect();
    let views: Vec<&[T]> = partials.iter().map(|p| &p[..]).collect();
    crate::dtype::reference_sum(&views)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything() {
        for len in [0, 1, 5, 100] {
            for parts in 1..5 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split(len, parts, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn one_node_reference_is_the_flat_reference() {
        let a = [1.0f32, 2.0];
        let b = [2f32.powi(-24), 3.0];
        let flat = crate::dtype::reference_sum(&[&a[..], &b[..], &b[..]]);
        assert_eq!(hierarchical_reference(&[&a[..], &b[..], &b[..]], &[0, 0, 0]), flat);
        // Two nodes {0} and {1, 2}: 1 + (2^-24 + 2^-24) = 1 + 2^-23, unlike the flat order.
        let h = hierarchical_reference(&[&a[..], &b[..], &b[..]], &[0, 1, 1]);
        assert_eq!(h[0], 1.0 + 2f32.powi(-23));
    }
}
