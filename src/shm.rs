//! POSIX shared memory: an owning mapping of a named segment.
//!
//! One rank of a node creates the segment and the others open it by name; the creator unlinks
//! the name once everybody has opened it, so nothing is left in `/dev/shm` even after a crash
//! later on. The pages are reserved with `posix_fallocate` at creation, so a full `/dev/shm`
//! is a clean error here instead of a `SIGBUS` in the middle of a collective.

use crate::error::{Error, Result};
use std::ffi::CString;

/// A mapped shared-memory segment, unmapped on drop.
pub struct ShmSegment {
    ptr: *mut u8,
    len: usize,
    name: String,
}

// SAFETY: the mapping is plain memory shared between processes; tpcomm synchronises every
// access to it with its own flag protocol.
unsafe impl Send for ShmSegment {}

impl ShmSegment {
    /// Create a new segment of `len` bytes (zero-filled) under `name` (`/something`).
    pub fn create(name: &str, len: usize) -> Result<Self> {
        Self::map(name, len, true)
    }

    /// Open a segment another process created.
    pub fn open(name: &str, len: usize) -> Result<Self> {
        Self::map(name, len, false)
    }

    /// Remove the name (mappings stay valid until dropped).
    pub fn unlink(&self) -> Result<()> {
        let cname = CString::new(self.name.as_str()).expect("segment names have no NUL");
        // SAFETY: cname is a valid C string.
        if unsafe { libc::shm_unlink(cname.as_ptr()) } != 0 {
            return Err(Error::last_os(format!("shm_unlink {}", self.name)));
        }
        Ok(())
    }

    fn map(name: &str, len: usize, create: bool) -> Result<Self> {
        let cname = CString::new(name).map_err(|_| Error::Internal(format!("bad shm name {name:?}")))?;
        let flags = if create { libc::O_CREAT | libc::O_EXCL | libc::O_RDWR } else { libc::O_RDWR };
        // SAFETY: cname is a valid C string; the result is checked.
        let fd = unsafe { libc::shm_open(cname.as_ptr(), flags, 0o600) };
        if fd < 0 {
            return Err(Error::last_os(format!("shm_open {name}")));
        }
        let result = (|| {
            if !create {
                // A segment shorter than expected would SIGBUS on first touch: refuse it here.
                // SAFETY: fd is open; st is written by fstat.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                if unsafe { libc::fstat(fd, &mut st) } != 0 {
                    return Err(Error::last_os(format!("fstat {name}")));
                }
                if (st.st_size as u64) < len as u64 {
                    return Err(Error::Internal(format!(
                        "shared-memory segment {name} has {} bytes, {len} expected",
                        st.st_size
                    )));
                }
            }
            if create {
                // SAFETY: fd is an open shared-memory object.
                if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
                    return Err(Error::last_os(format!("ftruncate {name} to {len} bytes")));
                }
                // SAFETY: as above; reserves the pages so later touches cannot SIGBUS.
                let rc = unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) };
                if rc != 0 {
                    return Err(Error::System {
                        op: format!("reserving {len} bytes of /dev/shm for {name} (is /dev/shm big enough?)"),
                        source: std::io::Error::from_raw_os_error(rc),
                    });
                }
            }
            // SAFETY: mapping a shared object of at least `len` bytes; checked below.
            let ptr = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
            };
            if ptr == libc::MAP_FAILED {
                return Err(Error::last_os(format!("mmap {name} ({len} bytes)")));
            }
            Ok(ptr as *mut u8)
        })();
        // SAFETY: fd is open; the mapping (if any) keeps the object alive.
        unsafe { libc::close(fd) };
        if result.is_err() && create {
            // SAFETY: valid C string; best effort cleanup of what we created.
            unsafe { libc::shm_unlink(cname.as_ptr()) };
        }
        Ok(ShmSegment { ptr: result?, len, name: name.to_string() })
    }

    /// Start of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `map`; nothing uses it after drop.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Segments made by this process, so two communicators never pick the same name.
static SEGMENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A segment of `len` bytes shared by every rank of `node`: local rank 0 creates it and
/// broadcasts its name, the others open it, and once everyone has tried the name is unlinked,
/// so nothing outlives the job. `tag` names the segment's purpose in `/dev/shm`.
///
/// # Collective
/// Every rank of `node` (the ranks of one node).
///
/// # Errors
/// [`Error::System`] when the segment cannot be made or opened (on every rank of the node);
/// [`Error::PeerTimeout`] when a rank does not arrive within `timeout`.
pub(crate) fn node_segment<C: mpi::traits::Communicator>(
    node: &C,
    tag: &str,
    len: usize,
    timeout: std::time::Duration,
) -> Result<ShmSegment> {
    use std::sync::atomic::Ordering;
    let local_rank = node.rank();
    let mut name = Vec::new();
    let mut created = None;
    let mut failure = None;
    if local_rank == 0 {
        let candidate = format!("/tpcomm.{}.{tag}.{}", std::process::id(), SEGMENTS.fetch_add(1, Ordering::Relaxed));
        match ShmSegment::create(&candidate, len) {
            Ok(seg) => {
                name = candidate.into_bytes();
                created = Some(seg);
            }
            Err(e) => failure = Some(e),
        }
    }
    crate::exchange::broadcast_bytes(node, 0, &mut name, timeout, "sharing a shared-memory segment's name")?;
    if name.is_empty() {
        return Err(failure.unwrap_or_else(|| Error::System {
            op: format!("creating the node's shared-memory segment of {len} bytes on local rank 0"),
            source: std::io::Error::other("failed on local rank 0; see its error"),
        }));
    }
    let opened = match created {
        Some(seg) => Ok(seg),
        None => ShmSegment::open(&String::from_utf8_lossy(&name), len),
    };
    // Everyone has tried to open before the name goes away.
    let all = crate::exchange::all_min_u64(node, u64::from(opened.is_ok()), timeout, "opening a shared-memory segment");
    if let (Ok(seg), 0) = (&opened, local_rank) {
        seg.unlink()?;
    }
    let seg = opened?;
    if all? == 0 {
        return Err(Error::System {
            op: format!("opening shared-memory segment {}", seg.name()),
            source: std::io::Error::other("another rank of this node could not open it"),
        });
    }
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_share_and_unlink() {
        let name = format!("/tpcomm-test-{}", std::process::id());
        let a = ShmSegment::create(&name, 8192).unwrap();
        let b = ShmSegment::open(&name, 8192).unwrap();
        a.unlink().unwrap();
        // SAFETY: both map the same 8192 bytes.
        unsafe {
            assert_eq!(*b.as_ptr().add(4000), 0, "fresh segments are zero-filled");
            *a.as_ptr().add(4000) = 42;
            assert_eq!(*b.as_ptr().add(4000), 42);
        }
        assert!(ShmSegment::open(&name, 8192).is_err(), "name is gone after unlink");
        let short = format!("/tpcomm-test-short-{}", std::process::id());
        let s = ShmSegment::create(&short, 4096).unwrap();
        assert!(ShmSegment::open(&short, 8192).is_err(), "a short segment is refused, not mapped");
        s.unlink().unwrap();
        assert!(ShmSegment::create("/tpcomm bad\0name", 10).is_err());
    }
}
