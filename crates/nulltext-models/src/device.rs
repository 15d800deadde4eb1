//! Opening compute devices the way nulltext uses them.

use candle_core::Device;

use crate::error::Result;

/// Opens CUDA device `n`. candle runs all of a device's work on one stream, so cudarc's
/// cross-stream event tracking (two CUDA events created and destroyed with every buffer —
/// thousands per null-text iteration) buys nothing; it is turned off unless
/// `NULLTEXT_CUDA_EVENT_TRACKING=1` asks for it.
pub fn cuda(n: usize) -> Result<Device> {
    let device = Device::new_cuda(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        if std::env::var("NULLTEXT_CUDA_EVENT_TRACKING").as_deref() != Ok("1") {
            // SAFETY: called before any buffer exists on this device, and candle never
            // uses a second stream, so no buffer needs cross-stream synchronization.
            unsafe { d.disable_event_tracking() };
        }
    }
    Ok(device)
}
