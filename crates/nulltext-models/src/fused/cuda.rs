//! Launches of the CUDA kernels in `kernels.cu` (compiled to PTX by `build.rs`, loaded once
//! per device), each generic over the element type `T` of its main argument (`mod.rs` picks
//! `T` with `per_element!`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout};

use super::GroupNormOp;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "nulltext-fused";

/// Threads per block of the norms (one block per group or row).
const NORM_THREADS: u32 = 512;
/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// An element type the kernels take (f32, f16, bf16).
pub(super) trait Kernel: CudaDType + DeviceRepr + candle_core::WithDType {}
impl<T: CudaDType + DeviceRepr + candle_core::WithDType> Kernel for T {}

/// The contiguous data of an argument, as elements of `T`.
fn view<'a, T: CudaDType>((s, l): Arg<'a>, what: &str) -> candle_core::Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, e)) => Ok(s.as_cuda_slice::<T>()?.slice(a..e)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// The name of kernel `name` for `T` (`nt_<name>_f32`, `_f16`, `_bf16`).
fn kernel<T: candle_core::WithDType>(name: &str) -> String {
    format!("nt_{name}_{}", T::DTYPE.as_str())
}

fn blocks(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elementwise(count: usize) -> LaunchConfig {
    blocks(count.div_ceil(THREADS as usize).max(1), THREADS)
}

fn output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it.
    unsafe { dev.alloc::<T>(len) }
}

/// Launches kernel `$name` for `$t` on `$cfg` with the arguments in the kernel's order.
macro_rules! launch {
    ($dev:expr, $t:ty, $name:literal, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func(&kernel::<$t>($name), MODULE, PTX)?;
        let mut builder = func.builder();
        $(builder.arg($arg);)+
        // SAFETY: the arguments match the kernel's parameters, and every output holds as
        // many elements as the kernel writes.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

fn int(v: usize) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds a kernel's int")))
}

/// Group norm (with `op.silu`, the SiLU after it) of `x`, one block per (image, group).
pub(super) fn group_norm<T: Kernel>(
    op: &GroupNormOp,
    x: Arg,
    gamma: Arg,
    beta: Arg,
    hw: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = x.0.device();
    let n = x.1.shape().elem_count();
    let c = gamma.1.shape().elem_count();
    let (xs, gs, bs) = (
        view::<T>(x, "x")?,
        view::<T>(gamma, "γ")?,
        view::<T>(beta, "β")?,
    );
    let y = output::<T>(dev, n)?;
    let (ci, hwi, gi) = (int(c)?, int(hw)?, int(op.groups)?);
    let (eps, silu) = (op.eps as f32, op.silu as i32);
    let cfg = blocks(n / (c / op.groups * hw).max(1), NORM_THREADS);
    launch!(dev, T, "group_norm", cfg; &xs, &gs, &bs, &y, &ci, &hwi, &gi, &eps, &silu);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// [`group_norm`]'s input gradient, with `affine` = `[γ | β]`.
pub(super) fn group_norm_backward<T: Kernel>(
    op: &GroupNormOp,
    x: Arg,
    dy: Arg,
    affine: Arg,
    hw: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = x.0.device();
    let n = x.1.shape().elem_count();
    let c = affine.1.shape().elem_count() / 2;
    let (xs, gs) = (view::<T>(x, "x")?, view::<T>(dy, "gradient")?);
    let aff = view::<T>(affine, "[γ | β]")?;
    let dx = output::<T>(dev, n)?;
    let (ci, hwi, gi) = (int(c)?, int(hw)?, int(op.groups)?);
    let (eps, silu) = (op.eps as f32, op.silu as i32);
    let cfg = blocks(n / (c / op.groups * hw).max(1), NORM_THREADS);
    launch!(dev, T, "group_norm_backward", cfg; &xs, &gs, &aff, &dx, &ci, &hwi, &gi, &eps, &silu);
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// Layer norm's input gradient over rows of width `d`, one block per row.
pub(super) fn layer_norm_backward<T: Kernel>(
    eps: f64,
    x: Arg,
    dy: Arg,
    gamma: Arg,
    d: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = x.0.device();
    let n = x.1.shape().elem_count();
    let (xs, gs, ga) = (
        view::<T>(x, "x")?,
        view::<T>(dy, "gradient")?,
        view::<T>(gamma, "γ")?,
    );
    let dx = output::<T>(dev, n)?;
    let (di, eps) = (int(d)?, eps as f32);
    launch!(dev, T, "layer_norm_backward", blocks(n / d, THREADS); &xs, &gs, &ga, &dx, &di, &eps);
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// GEGLU of rows `[a | b]` of width `2·inner`.
pub(super) fn geglu<T: Kernel>(h: Arg, inner: usize) -> candle_core::Result<CudaStorage> {
    let dev = h.0.device();
    let count = h.1.shape().elem_count() / 2;
    let hs = view::<T>(h, "geglu input")?;
    let y = output::<T>(dev, count)?;
    let (ni, ii) = (count as i64, int(inner)?);
    launch!(dev, T, "geglu", elementwise(count); &hs, &y, &ni, &ii);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// [`geglu`]'s input gradient for the output gradient `g`.
pub(super) fn geglu_backward<T: Kernel>(
    h: Arg,
    g: Arg,
    inner: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = h.0.device();
    let count = g.1.shape().elem_count();
    let (hs, gs) = (view::<T>(h, "geglu input")?, view::<T>(g, "gradient")?);
    let dh = output::<T>(dev, 2 * count)?;
    let (ni, ii) = (count as i64, int(inner)?);
    launch!(dev, T, "geglu_backward", elementwise(count); &hs, &gs, &dh, &ni, &ii);
    Ok(CudaStorage::wrap_cuda_slice(dh, dev.clone()))
}

/// Each row's log-sum-exp of `scale ·` scores (rows of width `n`), in f32.
pub(super) fn row_logsumexp<T: Kernel>(
    s: Arg,
    rows: usize,
    n: usize,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let dev = s.0.device();
    let ss = view::<T>(s, "scores")?;
    let lse = output::<f32>(dev, rows)?;
    let ni = int(n)?;
    let threads = if n <= 256 { 64 } else { NORM_THREADS };
    launch!(dev, T, "row_logsumexp", blocks(rows, threads); &ss, &lse, &ni, &scale);
    Ok(CudaStorage::wrap_cuda_slice(lse, dev.clone()))
}

/// The probabilities from scores (rows of width `n`) and their rows' log-sum-exp.
pub(super) fn probs<T: Kernel>(
    s: Arg,
    lse: Arg,
    n: usize,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let dev = s.0.device();
    let count = s.1.shape().elem_count();
    let (ss, ls) = (view::<T>(s, "scores")?, view::<f32>(lse, "log-sum-exp")?);
    let p = output::<T>(dev, count)?;
    let (ci, ni) = (count as i64, int(n)?);
    launch!(dev, T, "probs", elementwise(count); &ss, &ls, &p, &ci, &ni, &scale);
    Ok(CudaStorage::wrap_cuda_slice(p, dev.clone()))
}

/// Each row's dot product of `a` and `b` (rows of width `d`), in f32, one warp per row.
pub(super) fn row_dot<T: Kernel>(
    a: Arg,
    b: Arg,
    rows: usize,
    d: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = a.0.device();
    let (av, bv) = (view::<T>(a, "row dot")?, view::<T>(b, "row dot")?);
    let dot = output::<f32>(dev, rows)?;
    let (ri, di) = (rows as i64, int(d)?);
    let cfg = blocks((rows * 32).div_ceil(THREADS as usize).max(1), THREADS);
    launch!(dev, T, "row_dot", cfg; &av, &bv, &dot, &ri, &di);
    Ok(CudaStorage::wrap_cuda_slice(dot, dev.clone()))
}

/// The softmax's input gradient from the probabilities, their gradient and each row's dot
/// product (f32), rows of width `n`.
pub(super) fn softmax_grad<T: Kernel>(
    p: Arg,
    dp: Arg,
    dot: Arg,
    n: usize,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    let dev = p.0.device();
    let count = p.1.shape().elem_count();
    let (ps, gs) = (view::<T>(p, "probabilities")?, view::<T>(dp, "gradient")?);
    let ds = view::<f32>(dot, "row dot products")?;
    let out = output::<T>(dev, count)?;
    let (ci, ni) = (count as i64, int(n)?);
    launch!(dev, T, "softmax_grad", elementwise(count); &ps, &gs, &ds, &out, &ci, &ni, &scale);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
