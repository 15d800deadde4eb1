//! Carries out a [`Launch`] of the CUDA kernels in `kernels.cu` (compiled to PTX by
//! `build.rs`, loaded once per device) on the inputs' device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout};
use half::{bf16, f16};

use super::launch::{Arg, Launch};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "nulltext-fused";

/// A contiguous input, typed.
enum View<'a> {
    F32(CudaView<'a, f32>),
    F16(CudaView<'a, f16>),
    BF16(CudaView<'a, bf16>),
}

/// The launch's output buffer, typed.
enum Buffer {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

/// Runs `$body` with `$v` bound to the typed value of any variant of `$e`.
macro_rules! typed {
    ($e:expr, $ty:ident, |$v:ident| $body:expr) => {
        match $e {
            $ty::F32($v) => $body,
            $ty::F16($v) => $body,
            $ty::BF16($v) => $body,
        }
    };
}

impl<'a> View<'a> {
    fn new(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<Self> {
        let Some((a, e)) = l.contiguous_offsets() else {
            candle_core::bail!("the fused kernels take contiguous inputs");
        };
        Ok(match s.dtype() {
            DType::F32 => View::F32(s.as_cuda_slice::<f32>()?.slice(a..e)),
            DType::F16 => View::F16(s.as_cuda_slice::<f16>()?.slice(a..e)),
            DType::BF16 => View::BF16(s.as_cuda_slice::<bf16>()?.slice(a..e)),
            dt => candle_core::bail!("the fused kernels take f32, f16 or bf16, not {dt:?}"),
        })
    }
}

impl Buffer {
    fn new(dev: &CudaDevice, (len, dtype): (usize, DType)) -> candle_core::Result<Self> {
        // SAFETY: every element is written by the kernel that receives it.
        Ok(unsafe {
            match dtype {
                DType::F32 => Buffer::F32(dev.alloc(len)?),
                DType::F16 => Buffer::F16(dev.alloc(len)?),
                DType::BF16 => Buffer::BF16(dev.alloc(len)?),
                dt => candle_core::bail!("no fused kernel writes {dt:?}"),
            }
        })
    }

    fn into_storage(self, dev: &CudaDevice) -> CudaStorage {
        typed!(self, Buffer, |s| CudaStorage::wrap_cuda_slice(
            s,
            dev.clone()
        ))
    }
}

/// Runs `launch` on `inputs` (its `Arg::Input`s, in order) and returns its output.
pub(super) fn run(
    launch: &Launch,
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<CudaStorage> {
    let dev = inputs[0].0.device();
    let views = inputs
        .iter()
        .map(|(s, l)| View::new(s, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let out = Buffer::new(dev, launch.output)?;
    let func = dev.get_or_load_custom_func(&launch.kernel, MODULE, PTX)?;
    let mut builder = func.builder();
    for arg in &launch.args {
        push(&mut builder, arg, &views, &out)?;
    }
    let cfg = LaunchConfig {
        grid_dim: (launch.blocks, 1, 1),
        block_dim: (launch.threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `launch` lists the kernel's parameters in order with their types, and the
    // output holds as many elements as the kernel writes.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out.into_storage(dev))
}

fn push<'a>(
    builder: &mut LaunchArgs<'a>,
    arg: &'a Arg,
    views: &'a [View],
    out: &'a Buffer,
) -> candle_core::Result<()> {
    match arg {
        Arg::Input(i) => match views.get(*i) {
            Some(v) => typed!(v, View, |v| builder.arg(v)),
            None => candle_core::bail!("input {i} of {} missing", views.len()),
        },
        Arg::Output => typed!(out, Buffer, |s| builder.arg(s)),
        Arg::I32(v) => builder.arg(v),
        Arg::I64(v) => builder.arg(v),
        Arg::F32(v) => builder.arg(v),
    };
    Ok(())
}
