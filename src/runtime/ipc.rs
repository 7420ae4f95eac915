//! IPC memory, vendor-neutral: the handle peers exchange, and the vendor's buffers and mappings.
//!
//! A handle names a whole allocation and is 64 opaque bytes on both vendors (`CUipcMemHandle`,
//! `hipIpcMemHandle_t`), so it travels as [`IpcHandle`] and the exchange over MPI
//! (`backend/peer_group.rs`) is one code for both. The owning types are the vendor's, under the
//! same names: `IpcBuffer` (device memory peers can map; `alloc` for data, `alloc_signal` for the
//! flags and packets peers poll), `PeerMappings` (peers' buffers opened here, closed on drop)
//! and `export` (the handle of the allocation holding a pointer, and the pointer's offset).

pub(crate) use super::vendor::ipc::{export, IpcBuffer, PeerMappings};

/// Bytes of an IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// `IpcBuffer` sizes are rounded up to this granularity. Small `cuMemAlloc` allocations can
/// share a 2 MiB page; a peer that opened one of them then gets CUDA_ERROR_ALREADY_MAPPED for
/// the other (seen on H100, CUDA 13.0), so every exported allocation gets pages of its own (HIP
/// rounds alike; whether AMD needs it is not checked).
pub const IPC_GRANULARITY: usize = 2 << 20;

/// An exported IPC memory handle (opaque bytes, sent to peers over MPI).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcHandle(pub [u8; IPC_HANDLE_BYTES]);

impl std::fmt::Debug for IpcHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcHandle(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_print_their_first_bytes_only() {
        let mut h = [0u8; IPC_HANDLE_BYTES];
        h[0] = 0xab;
        h[7] = 0x01;
        h[8] = 0xff;
        assert_eq!(format!("{:?}", IpcHandle(h)), "IpcHandle(ab00000000000001..)");
    }
}
