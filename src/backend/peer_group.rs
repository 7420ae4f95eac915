//! The IPC set-up the IPC backends share: export some local device addresses, gather every
//! rank's, open the peers', and agree that it worked everywhere.
//!
//! One exchange serves every use: the custom and packet backends' own buffers at set-up,
//! registered buffers, and the buffers captured calls read (graph registration). Every step that
//! can fail on one rank ends with an agreement, so no rank is left waiting in an exchange the
//! others skipped, and a peer's blob of the wrong length is [`crate::Error::Mismatch`], never a
//! panic.

use crate::error::{Error, Result};
use crate::exchange::{agree, all_gather_bytes, records};
use crate::runtime::ipc::{self, IpcHandle, PeerMappings, IPC_HANDLE_BYTES};
use crate::runtime::protocol::MAX_RANKS;
use crate::runtime::Context;
use std::time::Duration;

/// An IPC backend (`what`: "custom allreduce") spans at most [`MAX_RANKS`] ranks of one node.
///
/// # Errors
/// [`Error::Unsupported`] for a larger group.
pub(crate) fn check_world(world: usize, what: &str) -> Result<()> {
    if world > MAX_RANKS {
        return Err(Error::Unsupported {
            what: format!("{what} over {world} ranks of one node"),
            reason: format!("it spans at most {MAX_RANKS} ranks"),
        });
    }
    Ok(())
}

/// How an IPC kernel family names itself and its waits in the errors its kernels record.
pub(crate) struct KernelWords {
    /// The operation of a mismatch (`"custom all_reduce"`).
    pub op: &'static str,
    /// The family, for peer failures and refused rows (`"custom allreduce"`).
    pub family: &'static str,
    /// What a wait (barrier or packet wait id of the error word) waited for, for timeouts.
    pub wait: fn(u32) -> &'static str,
}

/// The error an IPC kernel of `words`' family recorded in its error word `word` (`None`:
/// nothing recorded), as seen by `rank` whose waits were bounded by `timeout`.
pub(crate) fn kernel_error(word: u64, rank: usize, timeout: Duration, words: &KernelWords) -> Option<Error> {
    use crate::runtime::protocol::{decode_error, BarrierErrorKind};
    let t = decode_error(word)?;
    Some(match t.kind {
        BarrierErrorKind::Mismatch => Error::Mismatch {
            op: words.op,
            detail: format!(
                "rank {} (of the node) called with another length, dtype, algorithm or buffer layout (registered or \
                 not, in place or not, offset) than rank {rank} (seen at: {})",
                t.peer,
                (words.wait)(t.barrier)
            ),
        },
        BarrierErrorKind::Timeout => {
            Error::PeerTimeout { op: (words.wait)(t.barrier), peer: Some(t.peer), waited: timeout }
        }
        BarrierErrorKind::PeerFailed => {
            Error::PeerFailed { step: format!("{} (a peer failed while this rank waited)", words.family) }
        }
        BarrierErrorKind::BadRow => Error::usage(
            words.family,
            "a replayed graph's call has no registered buffers (captured outside a GraphRegistration, or replayed \
             after its registration was dropped); the kernel touched no memory",
        ),
    })
}

/// Bytes of one exported address: the allocation's handle and the offset into it.
const RECORD: usize = IPC_HANDLE_BYTES + 8;

/// Every rank's address of each of `exported`, in the order given: `addrs[i][r]` is rank `r`'s
/// `i`-th address as mapped into this process (`addrs[i][rank]` is our own), and `handles[i]`
/// the peers' handles opened for it (to close when every rank released it).
pub(crate) struct Shared {
    pub addrs: Vec<[u64; MAX_RANKS]>,
    pub handles: Vec<Vec<IpcHandle>>,
}

/// The IPC handle and offset of each of `ptrs` (device memory of `ctx`).
///
/// # Errors
/// [`crate::Error::Cuda`] for memory that cannot be exported (stream-ordered pools).
pub(crate) fn export_all(ctx: &Context, ptrs: &[u64]) -> Result<Vec<(IpcHandle, u64)>> {
    ptrs.iter().map(|&p| ipc::export(ctx, p)).collect()
}

/// Exchange `exported` (this rank's `(handle, offset)` per address, the same number on every
/// rank) with every rank of `comm`, open the peers' handles (cached in `peers`), and return the
/// table of everyone's addresses. `local[i]` is this rank's own `i`-th address.
///
/// # Collective
/// Every rank of `comm`, each with the same number of addresses.
///
/// # Errors
/// On every rank: [`crate::Error::Mismatch`] when ranks pass different numbers of addresses;
/// the local error ([`crate::Error::Cuda`]) where opening a handle fails here, and
/// [`crate::Error::PeerFailed`] where it failed elsewhere; [`crate::Error::PeerTimeout`].
pub(crate) fn share<C: mpi::traits::Communicator>(
    comm: &C,
    timeout: Duration,
    local: &[u64],
    exported: Result<Vec<(IpcHandle, u64)>>,
    peers: &mut PeerMappings,
    step: &'static str,
) -> Result<Shared> {
    let rank = comm.rank() as usize;
    let exported = agree(comm, exported, timeout, step)?;
    let mut mine = Vec::with_capacity(8 + exported.len() * RECORD);
    mine.extend_from_slice(&(exported.len() as u64).to_le_bytes());
    for (h, off) in &exported {
        mine.extend_from_slice(&h.0);
        mine.extend_from_slice(&off.to_le_bytes());
    }
    let all = all_gather_bytes(comm, &mine, timeout, step)?;
    let parsed = parse(&all, exported.len(), step);
    let parsed = agree(comm, parsed, timeout, step)?;
    let opened = (|| {
        let mut shared = Shared { addrs: vec![[0u64; MAX_RANKS]; local.len()], handles: vec![Vec::new(); local.len()] };
        for (r, records) in parsed.iter().enumerate() {
            for (i, (handle, off)) in records.iter().enumerate() {
                shared.addrs[i][r] = if r == rank {
                    local[i]
                } else {
                    shared.handles[i].push(*handle);
                    peers.open(handle)? + off
                };
            }
        }
        Ok(shared)
    })();
    agree(comm, opened, timeout, step)
}

/// Every rank's records from the gathered blobs (count first, then `(handle, offset)` each).
fn parse(all: &[Vec<u8>], n: usize, step: &'static str) -> Result<Vec<Vec<(IpcHandle, u64)>>> {
    all.iter()
        .enumerate()
        .map(|(r, blob)| {
            let count = records(blob.get(..8).unwrap_or(&[]), 1, 8, r, step)?[0];
            let count = u64::from_le_bytes(count.try_into().unwrap_or_default()) as usize;
            if count != n {
                return Err(crate::Error::Mismatch {
                    op: step,
                    detail: format!("rank {r} shares {count} buffers where this rank shares {n}"),
                });
            }
            records(&blob[8..], n, RECORD, r, step)?
                .into_iter()
                .map(|rec| {
                    let mut h = [0u8; IPC_HANDLE_BYTES];
                    h.copy_from_slice(&rec[..IPC_HANDLE_BYTES]);
                    let mut off = [0u8; 8];
                    off.copy_from_slice(&rec[IPC_HANDLE_BYTES..]);
                    Ok((IpcHandle(h), u64::from_le_bytes(off)))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(records: &[(u8, u64)]) -> Vec<u8> {
        let mut b = (records.len() as u64).to_le_bytes().to_vec();
        for &(h, off) in records {
            b.extend_from_slice(&[h; IPC_HANDLE_BYTES]);
            b.extend_from_slice(&off.to_le_bytes());
        }
        b
    }

    #[test]
    fn blobs_parse_and_malformed_ones_are_mismatches() {
        let all = vec![blob(&[(1, 0), (2, 64)]), blob(&[(3, 8), (4, 0)])];
        let parsed = parse(&all, 2, "test").unwrap();
        assert_eq!(parsed[1][0], (IpcHandle([3; IPC_HANDLE_BYTES]), 8));
        let short = vec![blob(&[(1, 0)]), blob(&[(3, 8), (4, 0)])];
        let err = parse(&short, 2, "test").unwrap_err();
        assert!(matches!(err, crate::Error::Mismatch { .. }) && err.to_string().contains("rank 0"), "{err}");
        let mut cut = blob(&[(1, 0), (2, 0)]);
        cut.truncate(30);
        assert!(matches!(parse(&[cut], 2, "test"), Err(crate::Error::Mismatch { .. })));
        assert!(matches!(parse(&[vec![1, 2]], 0, "test"), Err(crate::Error::Mismatch { .. })));
    }
}
