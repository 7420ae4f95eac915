//! HIP streams and graphs: what cudarc's `CudaStream` and `CudaGraph` are to the CUDA side.
//!
//! A [`HipStream`] is a non-blocking stream of one [`HipDevice`] (it does not wait for the null
//! stream, as tpcomm's CUDA streams do not). Capture follows CUDA's: [`HipStream::begin_capture`]
//! records the work enqueued next instead of running it, [`HipStream::end_capture`] instantiates
//! what was recorded as a [`HipGraph`], which keeps the stream it was captured on, and
//! [`HipGraph::launch`] replays it there (as cudarc's `CudaGraph` does). Both types free what
//! they own on drop and keep a failure there in their device. In a ROCm build these are
//! `tpcomm::Stream` and `tpcomm::Graph`.

use super::check;
use super::device::HipDevice;
use crate::error::{Error, Result};
use hip_runtime_sys::{
    hipEventCreateWithFlags, hipEventDestroy, hipEventDisableTiming, hipEventQuery, hipEventRecord, hipEvent_t,
    hipGraphDestroy, hipGraphExecDestroy, hipGraphExec_t, hipGraphInstantiate, hipGraphLaunch, hipGraph_t,
    hipStreamBeginCapture, hipStreamCaptureMode, hipStreamCaptureStatus, hipStreamCreateWithFlags, hipStreamDestroy,
    hipStreamEndCapture, hipStreamIsCapturing, hipStreamNonBlocking, hipStreamQuery, hipStreamSynchronize, hipStream_t,
};
use std::sync::Arc;

/// Whether a stream is capturing a graph (`hipStreamIsCapturing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureStatus {
    /// Work enqueued runs.
    None,
    /// Work enqueued is recorded into the graph being captured.
    Active,
    /// The capture failed (an operation not allowed in it); only ending it is left.
    Invalidated,
}

impl CaptureStatus {
    /// HIP's value as ours.
    ///
    /// # Errors
    /// [`Error::Internal`] for a value newer than the bindings.
    fn from_raw(raw: hipStreamCaptureStatus) -> Result<Self> {
        match raw {
            hipStreamCaptureStatus::hipStreamCaptureStatusNone => Ok(CaptureStatus::None),
            hipStreamCaptureStatus::hipStreamCaptureStatusActive => Ok(CaptureStatus::Active),
            hipStreamCaptureStatus::hipStreamCaptureStatusInvalidated => Ok(CaptureStatus::Invalidated),
            other => Err(Error::Internal(format!("hipStreamIsCapturing returned an unknown status {other:?}"))),
        }
    }
}

/// A non-blocking HIP stream of one device, destroyed on drop.
pub struct HipStream {
    device: Arc<HipDevice>,
    raw: hipStream_t,
}

// SAFETY: a HIP stream handle may be used from any thread; the HIP runtime is thread safe.
unsafe impl Send for HipStream {}
// SAFETY: as above; no `&self` method changes host state.
unsafe impl Sync for HipStream {}

impl HipStream {
    /// Create a stream on `device` (`hipStreamCreateWithFlags(hipStreamNonBlocking)`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] where HIP can use no AMD GPU; [`Error::Hip`].
    pub fn new(device: &Arc<HipDevice>) -> Result<Self> {
        device.bind()?;
        let mut raw: hipStream_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer; the flag is one HIP defines.
        check("hipStreamCreateWithFlags", unsafe { hipStreamCreateWithFlags(&mut raw, hipStreamNonBlocking) })?;
        Ok(HipStream { device: device.clone(), raw })
    }

    /// The raw handle, for launches and RCCL calls.
    pub fn raw(&self) -> hipStream_t {
        self.raw
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> &Arc<HipDevice> {
        &self.device
    }

    /// Wait until all work enqueued so far has finished (`hipStreamSynchronize`).
    ///
    /// # Errors
    /// [`Error::Hip`] when enqueued work failed.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: the handle is live for the life of `self`.
        check("hipStreamSynchronize", unsafe { hipStreamSynchronize(self.raw) })
    }

    /// Whether all work enqueued so far has finished (`hipStreamQuery`), without waiting.
    ///
    /// # Errors
    /// [`Error::Hip`] when enqueued work failed.
    pub fn query(&self) -> Result<bool> {
        // SAFETY: the handle is live for the life of `self`.
        match unsafe { hipStreamQuery(self.raw) } {
            hip_runtime_sys::hipError_t::hipErrorNotReady => Ok(false),
            other => check("hipStreamQuery", other).map(|()| true),
        }
    }

    /// Start recording the work enqueued on this stream into a graph (`hipStreamBeginCapture`).
    ///
    /// # Errors
    /// [`Error::Hip`], for example when the stream is capturing already.
    pub fn begin_capture(&self, mode: hipStreamCaptureMode) -> Result<()> {
        // SAFETY: the handle is live for the life of `self`.
        check("hipStreamBeginCapture", unsafe { hipStreamBeginCapture(self.raw, mode) })
    }

    /// Stop recording (`hipStreamEndCapture`) and instantiate what was recorded; the graph
    /// replays on this stream.
    ///
    /// # Errors
    /// [`Error::Hip`] when the capture was invalidated or the graph cannot be instantiated.
    pub fn end_capture(self: &Arc<Self>) -> Result<HipGraph> {
        let mut graph: hipGraph_t = std::ptr::null_mut();
        // SAFETY: the handle is live; `graph` is a valid out pointer.
        check("hipStreamEndCapture", unsafe { hipStreamEndCapture(self.raw, &mut graph) })?;
        if graph.is_null() {
            return Err(Error::Internal("hipStreamEndCapture succeeded but returned no graph".into()));
        }
        HipGraph::instantiate(self, graph)
    }

    /// Whether the stream is capturing (`hipStreamIsCapturing`).
    ///
    /// # Errors
    /// [`Error::Hip`] when HIP cannot tell.
    pub fn capture_status(&self) -> Result<CaptureStatus> {
        let mut raw = hipStreamCaptureStatus::hipStreamCaptureStatusNone;
        // SAFETY: the handle is live; `raw` is a valid out pointer.
        check("hipStreamIsCapturing", unsafe { hipStreamIsCapturing(self.raw, &mut raw) })?;
        CaptureStatus::from_raw(raw)
    }
}

impl Drop for HipStream {
    fn drop(&mut self) {
        // Never panic in Drop: the device keeps the first error for `check_err()`.
        // SAFETY: created in `new` and destroyed only here.
        self.device.release("hipStreamDestroy", || unsafe { hipStreamDestroy(self.raw) });
    }
}

/// An event without timing (`hipEventDisableTiming`), for telling whether the work enqueued on
/// a stream before it has finished: how the RCCL backend bounds a call whose peer never comes.
/// Destroyed on drop.
pub struct HipEvent {
    device: Arc<HipDevice>,
    raw: hipEvent_t,
}

// SAFETY: a HIP event may be recorded and queried from any thread; `record` takes `&mut self`.
unsafe impl Send for HipEvent {}

impl HipEvent {
    /// A new event on `device` (`hipEventCreateWithFlags`).
    ///
    /// # Errors
    /// [`Error::Unsupported`] where HIP can use no AMD GPU; [`Error::Hip`].
    pub fn new(device: &Arc<HipDevice>) -> Result<Self> {
        device.bind()?;
        let mut raw: hipEvent_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer; the flag is one HIP defines.
        check("hipEventCreateWithFlags", unsafe { hipEventCreateWithFlags(&mut raw, hipEventDisableTiming) })?;
        Ok(HipEvent { device: device.clone(), raw })
    }

    /// Mark the point after the work enqueued on `stream` so far (`hipEventRecord`).
    ///
    /// # Errors
    /// [`Error::Hip`].
    pub fn record(&mut self, stream: &HipStream) -> Result<()> {
        // SAFETY: both handles are live for the borrows.
        check("hipEventRecord", unsafe { hipEventRecord(self.raw, stream.raw()) })
    }

    /// Whether the work before the last record has finished (`hipEventQuery`), without waiting;
    /// `true` for an event never recorded.
    ///
    /// # Errors
    /// [`Error::Hip`] when that work failed.
    pub fn is_complete(&self) -> Result<bool> {
        // SAFETY: the handle is live for the life of `self`.
        match unsafe { hipEventQuery(self.raw) } {
            hip_runtime_sys::hipError_t::hipErrorNotReady => Ok(false),
            other => check("hipEventQuery", other).map(|()| true),
        }
    }
}

impl Drop for HipEvent {
    fn drop(&mut self) {
        // SAFETY: created in `new` and destroyed only here.
        self.device.release("hipEventDestroy", || unsafe { hipEventDestroy(self.raw) });
    }
}

/// A captured graph and its executable instance, both destroyed on drop, with the stream it
/// was captured on.
pub struct HipGraph {
    stream: Arc<HipStream>,
    graph: hipGraph_t,
    exec: hipGraphExec_t,
}

// SAFETY: graph handles may be used from any thread; launches go through HIP, which is thread safe.
unsafe impl Send for HipGraph {}
// SAFETY: as above; `launch` only reads the handles.
unsafe impl Sync for HipGraph {}

impl HipGraph {
    /// Instantiate `graph` (`hipGraphInstantiate`), taking ownership of it: it is destroyed
    /// when the instantiation fails too.
    fn instantiate(stream: &Arc<HipStream>, graph: hipGraph_t) -> Result<Self> {
        let device = &stream.device;
        let mut exec: hipGraphExec_t = std::ptr::null_mut();
        // SAFETY: `graph` came from hipStreamEndCapture; HIP accepts null error-node and log
        // pointers with a zero log size.
        let r = unsafe { hipGraphInstantiate(&mut exec, graph, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if let Err(e) = check("hipGraphInstantiate", r) {
            // SAFETY: owned here and not used after.
            device.record_err(check("hipGraphDestroy", unsafe { hipGraphDestroy(graph) }));
            return Err(e);
        }
        Ok(HipGraph { stream: stream.clone(), graph, exec })
    }

    /// Enqueue one replay of the graph on the stream it was captured on (`hipGraphLaunch`).
    ///
    /// # Errors
    /// [`Error::Hip`] when the launch fails.
    pub fn launch(&self) -> Result<()> {
        self.launch_on(&self.stream)
    }

    /// Enqueue one replay of the graph on `stream` (`hipGraphLaunch`).
    ///
    /// # Errors
    /// [`Error::Hip`] when the launch fails.
    pub fn launch_on(&self, stream: &HipStream) -> Result<()> {
        // SAFETY: both handles are live for the borrows.
        check("hipGraphLaunch", unsafe { hipGraphLaunch(self.exec, stream.raw) })
    }
}

impl Drop for HipGraph {
    fn drop(&mut self) {
        // SAFETY: instantiated in `instantiate` and destroyed only here, instance first.
        self.stream.device.release("hipGraphExecDestroy", || unsafe { hipGraphExecDestroy(self.exec) });
        // SAFETY: as above; the instance no longer refers to the graph.
        self.stream.device.release("hipGraphDestroy", || unsafe { hipGraphDestroy(self.graph) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::hip::device::select_arch;
    use crate::runtime::hip::rocm_device_count;

    #[test]
    fn capture_statuses_map_one_to_one() {
        use hipStreamCaptureStatus as S;
        assert_eq!(CaptureStatus::from_raw(S::hipStreamCaptureStatusNone).unwrap(), CaptureStatus::None);
        assert_eq!(CaptureStatus::from_raw(S::hipStreamCaptureStatusActive).unwrap(), CaptureStatus::Active);
        assert_eq!(CaptureStatus::from_raw(S::hipStreamCaptureStatusInvalidated).unwrap(), CaptureStatus::Invalidated);
    }

    /// The real runtime: without an AMD GPU, creating a stream on a device assumed to exist is
    /// Unsupported, not a panic and not a stream.
    #[test]
    fn a_stream_without_an_amd_gpu_is_unsupported() {
        if rocm_device_count().is_ok() {
            return; // a machine with an AMD GPU: the answer below is for machines without one
        }
        let dev = HipDevice::assumed(0, select_arch("gfx942").unwrap());
        match HipStream::new(&dev) {
            Err(Error::Unsupported { what, .. }) => assert!(what.contains("hipSetDevice"), "{what}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a stream without an AMD GPU"),
        }
    }
}
