//! Launches of the CUDA kernels in `kernels.cu` (compiled to PTX by `build.rs`, loaded once
//! per device).

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

fn int(v: usize) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds a kernel's int")))
}

pub(super) fn group_norm(
    op: &GroupNormOp,
    x: Arg,
    gamma: Arg,
    beta: Arg,
    hw: usize,
) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
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
        let func = dev.get_or_load_custom_func(&kernel::<T>("group_norm"), MODULE, PTX)?;
        let (ci, hwi, gi) = (int(c)?, int(hw)?, int(op.groups)?);
        let (eps, silu) = (op.eps as f32, op.silu as i32);
        let mut b = func.builder();
        b.arg(&xs).arg(&gs).arg(&bs).arg(&y);
        b.arg(&ci).arg(&hwi).arg(&gi).arg(&eps).arg(&silu);
        // one block per (image, group)
        let units = n / (c / op.groups * hw).max(1);
        // SAFETY: the arguments match the kernel's parameters; `y` holds `n` elements.
        unsafe { b.launch(blocks(units, NORM_THREADS)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    per_element!(x.0.dtype(), run(op, x, gamma, beta, hw))
}

pub(super) fn group_norm_backward(
    op: &GroupNormOp,
    x: Arg,
    dy: Arg,
    affine: Arg,
    hw: usize,
) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
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
        let func = dev.get_or_load_custom_func(&kernel::<T>("group_norm_backward"), MODULE, PTX)?;
        let (ci, hwi, gi) = (int(c)?, int(hw)?, int(op.groups)?);
        let (eps, silu) = (op.eps as f32, op.silu as i32);
        let mut b = func.builder();
        b.arg(&xs).arg(&gs).arg(&aff).arg(&dx);
        b.arg(&ci).arg(&hwi).arg(&gi).arg(&eps).arg(&silu);
        // one block per (image, group)
        let units = n / (c / op.groups * hw).max(1);
        // SAFETY: the arguments match the kernel's parameters; `dx` holds `n` elements.
        unsafe { b.launch(blocks(units, NORM_THREADS)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
    per_element!(x.0.dtype(), run(op, x, dy, affine, hw))
}

pub(super) fn layer_norm_backward(
    eps: f64,
    x: Arg,
    dy: Arg,
    gamma: Arg,
    d: usize,
) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        eps: f64,
        x: Arg,
        dy: Arg,
        gamma: Arg,
        d: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = x.0.device();
        let n = x.1.shape().elem_count();
        let (xs, gs) = (view::<T>(x, "x")?, view::<T>(dy, "gradient")?);
        let ga = view::<T>(gamma, "γ")?;
        let dx = output::<T>(dev, n)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("layer_norm_backward"), MODULE, PTX)?;
        let (di, eps) = (int(d)?, eps as f32);
        let mut b = func.builder();
        b.arg(&xs).arg(&gs).arg(&ga).arg(&dx).arg(&di).arg(&eps);
        // SAFETY: the arguments match the kernel's parameters; `dx` holds `n` elements.
        unsafe { b.launch(blocks(n / d, THREADS)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
    per_element!(x.0.dtype(), run(eps, x, dy, gamma, d))
}

pub(super) fn geglu(h: Arg, inner: usize) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        h: Arg,
        inner: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = h.0.device();
        let count = h.1.shape().elem_count() / 2;
        let hs = view::<T>(h, "geglu input")?;
        let y = output::<T>(dev, count)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("geglu"), MODULE, PTX)?;
        let (ni, ii) = (count as i64, int(inner)?);
        let mut b = func.builder();
        b.arg(&hs).arg(&y).arg(&ni).arg(&ii);
        // SAFETY: the arguments match the kernel's parameters; `y` holds `count` elements.
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    per_element!(h.0.dtype(), run(h, inner))
}

pub(super) fn geglu_backward(h: Arg, g: Arg, inner: usize) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        h: Arg,
        g: Arg,
        inner: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = h.0.device();
        let count = g.1.shape().elem_count();
        let (hs, gs) = (view::<T>(h, "geglu input")?, view::<T>(g, "gradient")?);
        let dh = output::<T>(dev, 2 * count)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("geglu_backward"), MODULE, PTX)?;
        let (ni, ii) = (count as i64, int(inner)?);
        let mut b = func.builder();
        b.arg(&hs).arg(&gs).arg(&dh).arg(&ni).arg(&ii);
        // SAFETY: the arguments match the kernel's parameters; `dh` holds `2·count` elements.
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dh, dev.clone()))
    }
    per_element!(h.0.dtype(), run(h, g, inner))
}

pub(super) fn row_logsumexp(
    s: Arg,
    rows: usize,
    n: usize,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        s: Arg,
        rows: usize,
        n: usize,
        scale: f32,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.0.device();
        let ss = view::<T>(s, "scores")?;
        let lse = output::<f32>(dev, rows)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("row_logsumexp"), MODULE, PTX)?;
        let ni = int(n)?;
        let mut b = func.builder();
        b.arg(&ss).arg(&lse).arg(&ni).arg(&scale);
        let threads = if n <= 256 { 64 } else { NORM_THREADS };
        // SAFETY: the arguments match the kernel's parameters; `lse` holds one value per row.
        unsafe { b.launch(blocks(rows, threads)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(lse, dev.clone()))
    }
    per_element!(s.0.dtype(), run(s, rows, n, scale))
}

pub(super) fn probs(s: Arg, lse: Arg, n: usize, scale: f32) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        s: Arg,
        lse: Arg,
        n: usize,
        scale: f32,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.0.device();
        let count = s.1.shape().elem_count();
        let (ss, ls) = (view::<T>(s, "scores")?, view::<f32>(lse, "log-sum-exp")?);
        let p = output::<T>(dev, count)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("probs"), MODULE, PTX)?;
        let (ci, ni) = (count as i64, int(n)?);
        let mut b = func.builder();
        b.arg(&ss).arg(&ls).arg(&p).arg(&ci).arg(&ni).arg(&scale);
        // SAFETY: the arguments match the kernel's parameters; `p` holds `count` elements.
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(p, dev.clone()))
    }
    per_element!(s.0.dtype(), run(s, lse, n, scale))
}

pub(super) fn row_dot(a: Arg, b: Arg, rows: usize, d: usize) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        a: Arg,
        b: Arg,
        rows: usize,
        d: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = a.0.device();
        let (av, bv) = (view::<T>(a, "row dot")?, view::<T>(b, "row dot")?);
        let dot = output::<f32>(dev, rows)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("row_dot"), MODULE, PTX)?;
        let (ri, di) = (rows as i64, int(d)?);
        let mut bl = func.builder();
        bl.arg(&av).arg(&bv).arg(&dot).arg(&ri).arg(&di);
        // one warp per row
        let cfg = blocks((rows * 32).div_ceil(THREADS as usize).max(1), THREADS);
        // SAFETY: the arguments match the kernel's parameters; `dot` holds one value per row.
        unsafe { bl.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dot, dev.clone()))
    }
    per_element!(a.0.dtype(), run(a, b, rows, d))
}

pub(super) fn softmax_grad(
    p: Arg,
    dp: Arg,
    dot: Arg,
    n: usize,
    scale: f32,
) -> candle_core::Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
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
        let func = dev.get_or_load_custom_func(&kernel::<T>("softmax_grad"), MODULE, PTX)?;
        let (ci, ni) = (count as i64, int(n)?);
        let mut b = func.builder();
        b.arg(&ps)
            .arg(&gs)
            .arg(&ds)
            .arg(&out)
            .arg(&ci)
            .arg(&ni)
            .arg(&scale);
        // SAFETY: the arguments match the kernel's parameters; `out` holds `count` elements.
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    per_element!(p.0.dtype(), run(p, dp, dot, n, scale))
}
