//! Opening compute devices the way nulltext uses them, and capturing device work as CUDA
//! graphs.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

use crate::error::Result;

/// Opens CUDA device `n`, set up for many short-lived tensors:
///
/// - candle runs all of a device's work on one stream, so cudarc's cross-stream event
///   tracking (two CUDA events created and destroyed with every buffer — thousands per
///   null-text iteration) buys nothing; it is turned off unless
///   `NULLTEXT_CUDA_EVENT_TRACKING=1` asks for it;
/// - buffers come from the device's stream-ordered memory pool, which by default returns
///   its free memory to the driver at every synchronization, so that every step allocates
///   its buffers afresh; the pool now keeps what it has for reuse, as PyTorch's caching
///   allocator does (`NULLTEXT_CUDA_POOL=release` restores the driver's default).
pub fn cuda(n: usize) -> Result<Device> {
    let device = Device::new_cuda(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        if std::env::var("NULLTEXT_CUDA_EVENT_TRACKING").as_deref() != Ok("1") {
            // SAFETY: called before any buffer exists on this device, and candle never
            // uses a second stream, so no buffer needs cross-stream synchronization.
            unsafe { d.disable_event_tracking() };
        }
        if std::env::var("NULLTEXT_CUDA_POOL").as_deref() != Ok("release") {
            keep_pool_memory(d)?;
        }
    }
    Ok(device)
}

/// Sets the release threshold of the device's default memory pool to its maximum.
#[cfg(feature = "cuda")]
fn keep_pool_memory(d: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;

    let stream = d.cuda_stream();
    let ctx = stream.context();
    let fail = |what: &str, e: sys::CUresult| {
        crate::Error::Msg(format!("CUDA memory pool: {what} failed ({e:?})"))
    };
    ctx.bind_to_thread()
        .map_err(|e| crate::Error::Msg(format!("CUDA context: {e}")))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool; the attribute takes a u64.
    unsafe {
        match sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) {
            sys::CUresult::CUDA_SUCCESS => {}
            e => return Err(fail("cuDeviceGetDefaultMemPool", e)),
        }
        match sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        ) {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(fail("cuMemPoolSetAttribute", e)),
        }
    }
}

/// Whether loops of identical iterations are asked to capture their device work as a CUDA
/// graph and replay it: `NULLTEXT_CUDA_GRAPHS=on` (off by default), read once.
pub fn graphs_requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("NULLTEXT_CUDA_GRAPHS").as_deref() == Ok("on"))
}

/// Set when a capture or a launch of a graph failed: the process goes on without graphs.
static GRAPH_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether [`capture`] works on `device`: a CUDA device in a CUDA build, with cudarc's
/// event tracking off (its waits on events recorded before a capture would end it), as
/// long as no graph has failed in this process.
pub fn graphs_supported(device: &Device) -> bool {
    if GRAPH_FAILED.load(Ordering::Relaxed) {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => !d.is_event_tracking(),
        _ => false,
    }
}

/// `r`, noting a failure for [`graphs_supported`].
#[cfg(feature = "cuda")]
fn note_failure<T, E>(r: Result<T, E>) -> Result<T, E> {
    if r.is_err() {
        GRAPH_FAILED.store(true, Ordering::Relaxed);
    }
    r
}

/// Device work captured once and replayed: a CUDA graph.
pub struct Graph {
    #[cfg(feature = "cuda")]
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
}

impl Graph {
    /// Runs the captured work again, on the same buffers (asynchronously, on the device's
    /// stream).
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        return note_failure(self.graph.launch())
            .map_err(|e| crate::Error::Msg(format!("CUDA graph launch: {e}")));
        #[cfg(not(feature = "cuda"))]
        unreachable!("a graph exists only in CUDA builds")
    }
}

/// Runs `f` as a capture will see it: on a CUDA device, candle keeps the small host→device
/// copies of kernel parameters (shapes, strides) that `f` makes, which a capture cannot
/// make, so that a [`capture`] of the same work finds them. Elsewhere it just runs `f`.
pub fn warm_up<T, E>(device: &Device, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let _cache = d.enable_cuda_graph_htod_cache();
        return f();
    }
    let _ = device;
    f()
}

/// Records the device work of `f` on `device`'s stream as a [`Graph`] without running it
/// (launch the graph to run it). `f` must have run once under [`warm_up`] with the same
/// shapes, and must leave nothing allocated during the capture alive when it returns
/// (results go into buffers that existed before, e.g. with `Var::set`); it may not copy
/// data to or from the host. If `f` fails, the capture ends and its error is returned.
pub fn capture<E: From<crate::Error>>(
    device: &Device,
    f: impl FnOnce() -> Result<(), E>,
) -> Result<Graph, E> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            crate::Error::Msg(format!("CUDA graph capture: {what}: {e}"))
        };
        let _cache = d.enable_cuda_graph_htod_cache();
        let stream = d.cuda_stream();
        let captured = (|| {
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(|e| fail("begin", &e))?;
            let work = f();
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            work?;
            match graph.map_err(|e| fail("end", &e))? {
                Some(graph) => Ok(Graph { graph }),
                None => Err(fail("end", &"no work was captured").into()),
            }
        })();
        return note_failure(captured);
    }
    let _ = f;
    Err(crate::Error::Msg(format!(
        "CUDA graphs need a CUDA device (this is {device:?})"
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_need_a_cuda_device() {
        let cpu = Device::Cpu;
        assert!(!graphs_supported(&cpu));
        assert_eq!(warm_up(&cpu, || Ok::<_, crate::Error>(7)).unwrap(), 7);
        let mut ran = false;
        let e = capture(&cpu, || -> Result<()> {
            ran = true;
            Ok(())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("need a CUDA device"), "{e}");
        assert!(!ran, "nothing is captured, nor run, on the CPU");
    }
}
