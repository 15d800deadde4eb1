//! Opening compute devices the way nulltext uses them.

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
