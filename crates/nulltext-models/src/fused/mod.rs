//! Layers that run as one kernel each way where candle's tensor ops take one per
//! element-wise step: group norm (with the SiLU after it) and its input gradient, layer
//! norm's input gradient, GEGLU and its input gradient, and the steps of attention between
//! its matrix products (each query's log-sum-exp, the probabilities from it, the softmax's
//! input gradient).
//!
//! Each is a candle custom op with two implementations of the same formulas, both computing
//! in f32 for f32, f16 and bf16 tensors: on the CPU nulltext's kernels
//! (`crate::cpu::kernels`, or the loops here), and, built with the `cuda` feature, its CUDA
//! kernels (`kernels.cu`, with f64 sums for the statistics), launched as `launch.rs`
//! describes. The layers call them wherever [`applies`] says so, and candle's tensor ops
//! elsewhere (f64, Metal): a half-precision pass on the CPU takes the very path a GPU takes,
//! so the CPU tests run the host-side code of the GPU's; and the tests run the CUDA kernels
//! themselves, with the same launches, on the CPU (`emulator.rs`).

/// Runs `$f::<T>(…)` for the element type `T` of a dtype (f32, f16, bf16).
macro_rules! per_element {
    ($dtype:expr, $f:ident ($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            dt => candle_core::bail!("the fused kernels take f32, f16 or bf16, not {dt:?}"),
        }
    };
}

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod emulator;
#[cfg(any(feature = "cuda", test))]
mod launch;

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Whether the fused kernels run on `t`: f32, f16 or bf16 on the CPU or on a CUDA GPU (with
/// the `cuda` feature); f64 and other devices take candle's tensor ops.
/// `NULLTEXT_FUSED_KERNELS=off` turns them off everywhere, for comparison.
pub(crate) fn applies(t: &Tensor) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled =
        ENABLED.get_or_init(|| std::env::var("NULLTEXT_FUSED_KERNELS").as_deref() != Ok("off"));
    let half_or_single = matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16);
    *enabled
        && match t.device() {
            Device::Cpu => half_or_single,
            Device::Cuda(_) => cfg!(feature = "cuda") && half_or_single,
            _ => false,
        }
}

/// Whether the fused kernels run on `x` with the other tensors of a call (same device and
/// dtype; gradients and frozen weights, not graph nodes).
pub(crate) fn applies_with(x: &Tensor, others: &[&Tensor]) -> bool {
    applies(x)
        && others
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.device().same_device(x.device()))
}

/// An element type of the fused ops' CPU implementations, read and written one value at a
/// time around f32 arithmetic (so that large half-precision tensors need no f32 copy).
trait Element: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! element {
    ($t:ty, $variant:ident, |$x:ident| $get:expr, |$v:ident| $put:expr) => {
        impl Element for $t {
            fn get(self) -> f32 {
                let $x = self;
                $get
            }
            fn put($v: f32) -> Self {
                $put
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

element!(f32, F32, |x| x, |v| v);
element!(f16, F16, |x| x.to_f32(), |v| f16::from_f32(v));
element!(bf16, BF16, |x| x.to_f32(), |v| bf16::from_f32(v));

/// The contiguous data of a CPU storage of `T`.
fn typed<'a, T: Element>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match (T::slice(s), l.contiguous_offsets()) {
        (Some(v), Some((a, e))) => Ok(&v[a..e]),
        _ => candle_core::bail!("{what}: a contiguous tensor of the op's dtype expected"),
    }
}

/// The data of a contiguous CPU storage as f32: borrowed in f32, converted from f16 and
/// bf16 (for the f32 CPU kernels).
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Cow<'a, [f32]>> {
    fn widen<T: Element>(v: &[T]) -> Cow<'static, [f32]> {
        Cow::Owned(v.iter().map(|x| x.get()).collect())
    }
    Ok(match s.dtype() {
        DType::F32 => Cow::Borrowed(typed::<f32>(s, l, what)?),
        DType::F16 => widen(typed::<f16>(s, l, what)?),
        DType::BF16 => widen(typed::<bf16>(s, l, what)?),
        dt => candle_core::bail!("{what}: the fused kernels take f32, f16 or bf16, not {dt:?}"),
    })
}

/// f32 results as a CPU storage of `dtype` (f32, f16 or bf16; rounded to nearest).
fn storage(v: Vec<f32>, dtype: DType) -> CpuStorage {
    fn narrow<T: Element>(v: Vec<f32>) -> CpuStorage {
        T::storage(v.into_iter().map(T::put).collect())
    }
    match dtype {
        DType::F16 => narrow::<f16>(v),
        DType::BF16 => narrow::<bf16>(v),
        _ => CpuStorage::F32(v),
    }
}

/// A tensor's values as a contiguous f32 host vector (for backward passes, which receive
/// tensors rather than storages).
fn host_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Channels and the size of each channel's plane of an `[N, C, …]` input.
fn channels_and_plane(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let dims = l.shape().dims();
    if dims.len() < 2 {
        candle_core::bail!("group norm: input of shape {dims:?}");
    }
    Ok((dims[1], dims[2..].iter().product()))
}

/// `[γ | β]` (`[2C]`), the affine parameters as [`GroupNormGrad`] takes them.
pub(crate) fn stacked_affine(gamma: &Tensor, beta: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::cat(&[gamma.flatten_all()?, beta.flatten_all()?], 0)?.contiguous()
}

/// Group normalization of `x` `[N, C, …]` with γ and β (arguments `x`, γ, β); with `silu`,
/// the SiLU after the normalization in the same pass. One graph node whose backward is the
/// input gradient ([`GroupNormGrad`]) and, when γ and β are trained (on the CPU), theirs
/// (`crate::cpu::kernels::group_norm_affine_grads`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupNormOp {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
}

impl GroupNormOp {
    /// The input gradient for the output gradient `g`, with `affine` from
    /// [`stacked_affine`].
    pub(crate) fn input_grad(
        self,
        x: &Tensor,
        g: &Tensor,
        affine: &Tensor,
    ) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op3_no_bwd(&g.contiguous()?, affine, &GroupNormGrad(self))
    }

    fn check(&self, c: usize, affine: &[usize]) -> candle_core::Result<()> {
        if self.groups == 0 || !c.is_multiple_of(self.groups) || affine.iter().any(|n| *n != c) {
            candle_core::bail!(
                "group norm: {c} channels in {} groups, affine parameters of {affine:?}",
                self.groups
            );
        }
        Ok(())
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, hw) = channels_and_plane(l1)?;
        let (gamma, beta) = (&*values(s2, l2, "γ")?, &*values(s3, l3, "β")?);
        self.check(c, &[gamma.len(), beta.len()])?;
        let x = &*values(s1, l1, "group norm input")?;
        let out = crate::cpu::kernels::group_norm(
            x,
            c,
            hw,
            self.groups,
            gamma,
            beta,
            self.eps,
            self.silu,
        );
        Ok((storage(out, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (c, hw) = channels_and_plane(l1)?;
        self.check(c, &[l2.shape().elem_count(), l3.shape().elem_count()])?;
        let launch = launch::group_norm(s1.dtype(), self, l1.shape().elem_count(), c, hw)?;
        let y = cuda::run(&launch, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((y, l1.shape().clone()))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .track_op()
            .then(|| self.input_grad(&x.detach(), g, &stacked_affine(&w.detach(), &b.detach())?))
            .transpose()?;
        if !w.track_op() && !b.track_op() {
            return Ok((dx, None, None));
        }
        let c = x.dim(1)?;
        let hw = x.elem_count() / (x.dim(0)? * c).max(1);
        let (dg, db) = crate::cpu::kernels::group_norm_affine_grads(
            &host_values(x)?,
            &host_values(g)?,
            c,
            hw,
            self.groups,
            (&host_values(w)?, &host_values(b)?),
            self.eps,
            self.silu,
        );
        Ok((
            dx,
            Some(Tensor::from_vec(dg, c, x.device())?.to_dtype(w.dtype())?),
            Some(Tensor::from_vec(db, c, x.device())?.to_dtype(b.dtype())?),
        ))
    }
}

/// The input gradient of a [`GroupNormOp`]: arguments `x`, the output gradient and
/// `[γ | β]`.
pub(crate) struct GroupNormGrad(GroupNormOp);

impl candle_core::CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, hw) = channels_and_plane(l1)?;
        same_shape(l1, l2, "group norm")?;
        let affine = &*values(s3, l3, "[γ | β]")?;
        self.0
            .check(c, &[affine.len() / 2, affine.len() - affine.len() / 2])?;
        let dx = crate::cpu::kernels::group_norm_backward(
            &values(s1, l1, "group norm input")?,
            &values(s2, l2, "group norm gradient")?,
            c,
            hw,
            self.0.groups,
            affine.split_at(c),
            self.0.eps,
            self.0.silu,
        );
        Ok((storage(dx, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (c, hw) = channels_and_plane(l1)?;
        same_shape(l1, l2, "group norm")?;
        let n = l3.shape().elem_count();
        self.0.check(c, &[n / 2, n - n / 2])?;
        let count = l1.shape().elem_count();
        let launch = launch::group_norm_backward(s1.dtype(), &self.0, count, c, hw)?;
        let dx = cuda::run(&launch, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((dx, l1.shape().clone()))
    }
}

fn same_shape(x: &Layout, g: &Layout, what: &str) -> candle_core::Result<()> {
    if x.dims() != g.dims() {
        candle_core::bail!(
            "{what} backward: gradient of shape {:?} for an input of shape {:?}",
            g.dims(),
            x.dims()
        );
    }
    Ok(())
}

/// The input gradient of layer normalization over the last dimension (width `d`):
/// arguments `x`, the output gradient and γ (`crate::cpu::kernels::layer_norm_backward`).
pub(crate) struct LayerNormGrad(pub(crate) f64);

impl LayerNormGrad {
    fn width(l: &Layout, gamma: &Layout) -> candle_core::Result<usize> {
        let d = l.dims().last().copied().unwrap_or(0);
        if d == 0 || gamma.shape().elem_count() != d {
            candle_core::bail!("layer norm: width {d}, γ of {:?}", gamma.dims());
        }
        Ok(d)
    }
}

impl candle_core::CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, "layer norm")?;
        let d = Self::width(l1, l3)?;
        let dx = crate::cpu::kernels::layer_norm_backward(
            &values(s1, l1, "layer norm input")?,
            &values(s2, l2, "layer norm gradient")?,
            d,
            &values(s3, l3, "γ")?,
            self.0,
        );
        Ok((storage(dx, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shape(l1, l2, "layer norm")?;
        let d = Self::width(l1, l3)?;
        let launch = launch::layer_norm_backward(s1.dtype(), self.0, l1.shape().elem_count(), d)?;
        let dx = cuda::run(&launch, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((dx, l1.shape().clone()))
    }
}

/// The width of a GEGLU's output for rows `[a | b]` of `h`.
fn geglu_inner(h: &Layout) -> candle_core::Result<usize> {
    let width = h.dims().last().copied().unwrap_or(0);
    if width == 0 || width % 2 != 0 {
        candle_core::bail!("geglu: input rows of width {width}");
    }
    Ok(width / 2)
}

/// `a · gelu(b)` for rows `h = [a | b]` (`crate::cpu::kernels::geglu`); its backward is
/// [`GegluGrad`].
pub(crate) struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let inner = geglu_inner(l)?;
        let out = crate::cpu::kernels::geglu(&values(s, l, "geglu input")?, inner);
        Ok((storage(out, s.dtype()), geglu_shape(l, inner)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inner = geglu_inner(l)?;
        let launch = launch::geglu(s.dtype(), l.shape().elem_count() / 2, inner)?;
        Ok((cuda::run(&launch, &[(s, l)])?, geglu_shape(l, inner)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            h.detach()
                .contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &GegluGrad)?,
        ))
    }
}

fn geglu_shape(l: &Layout, inner: usize) -> Shape {
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = inner;
    }
    dims.into()
}

/// The gradient of [`GegluOp`]'s input: arguments `h` and the output gradient `g`,
/// `[g · gelu(b) | g · a · gelu′(b)]` (`crate::cpu::kernels::geglu_backward`).
pub(crate) struct GegluGrad;

impl GegluGrad {
    fn check(h: &Layout, g: &Layout) -> candle_core::Result<usize> {
        let inner = geglu_inner(h)?;
        if geglu_shape(h, inner).dims() != g.dims() {
            candle_core::bail!(
                "geglu backward: gradient of shape {:?} for an input of shape {:?}",
                g.dims(),
                h.dims()
            );
        }
        Ok(inner)
    }
}

impl candle_core::CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inner = Self::check(l1, l2)?;
        let dh = crate::cpu::kernels::geglu_backward(
            &values(s1, l1, "geglu input")?,
            &values(s2, l2, "geglu gradient")?,
            inner,
        );
        Ok((storage(dh, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let inner = Self::check(l1, l2)?;
        let launch = launch::geglu_backward(s1.dtype(), l2.shape().elem_count(), inner)?;
        Ok((
            cuda::run(&launch, &[(s1, l1), (s2, l2)])?,
            l1.shape().clone(),
        ))
    }
}

/// The width of the rows of a `[…, n]` argument and their number.
fn rows(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let n = l.dims().last().copied().unwrap_or(0);
    if n == 0 {
        candle_core::bail!("attention: rows of width 0 in {:?}", l.dims());
    }
    Ok((l.shape().elem_count() / n, n))
}

/// `[…, 1]` for rows of `l`.
fn per_row(l: &Layout) -> Shape {
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = 1;
    }
    dims.into()
}

fn check_per_row(rows: usize, values: &Layout, what: &str) -> candle_core::Result<()> {
    if values.shape().elem_count() != rows {
        candle_core::bail!(
            "attention: {what} of shape {:?} for {rows} rows",
            values.dims()
        );
    }
    Ok(())
}

/// Each row's `log Σⱼ exp(scale · sⱼ)` of scores `s` `[…, n]`, as `[…, 1]` in f32 whatever
/// the scores' dtype.
pub(crate) struct RowLogSumExp(pub(crate) f32);

impl CustomOp1 for RowLogSumExp {
    fn name(&self) -> &'static str {
        "row-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Element>(s: &[T], n: usize, scale: f32) -> candle_core::Result<Vec<f32>> {
            Ok(s.par_chunks(n)
                .map(|row| {
                    let m = row
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, v| m.max(scale * v.get()));
                    let sum: f64 = row
                        .iter()
                        .map(|v| ((scale * v.get() - m) as f64).exp())
                        .sum();
                    m + sum.ln() as f32
                })
                .collect())
        }
        let (_, n) = rows(l)?;
        let lse = per_element!(s.dtype(), run(typed(s, l, "scores")?, n, self.0))?;
        Ok((CpuStorage::F32(lse), per_row(l)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (count, n) = rows(l)?;
        let launch = launch::row_logsumexp(s.dtype(), count, n, self.0)?;
        Ok((cuda::run(&launch, &[(s, l)])?, per_row(l)))
    }
}

/// The probabilities `exp(scale · s − lse)` from scores `s` `[…, n]` and their rows'
/// log-sum-exp (f32, `[…, 1]`), in the scores' dtype.
pub(crate) struct Probs(pub(crate) f32);

impl candle_core::CustomOp2 for Probs {
    fn name(&self) -> &'static str {
        "probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            s: &[T],
            lse: &[f32],
            n: usize,
            scale: f32,
        ) -> candle_core::Result<CpuStorage> {
            let mut p = vec![T::put(0.0); s.len()];
            p.par_chunks_mut(n)
                .zip(s.par_chunks(n))
                .zip(lse.par_iter())
                .for_each(|((p, row), lse)| {
                    for (p, v) in p.iter_mut().zip(row) {
                        *p = T::put((scale * v.get() - lse).exp());
                    }
                });
            Ok(T::storage(p))
        }
        let (count, n) = rows(l1)?;
        check_per_row(count, l2, "log-sum-exp")?;
        let lse = typed::<f32>(s2, l2, "log-sum-exp")?;
        let p = per_element!(s1.dtype(), run(typed(s1, l1, "scores")?, lse, n, self.0))?;
        Ok((p, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (count, n) = rows(l1)?;
        check_per_row(count, l2, "log-sum-exp")?;
        let launch = launch::probs(s1.dtype(), l1.shape().elem_count(), n, self.0)?;
        Ok((
            cuda::run(&launch, &[(s1, l1), (s2, l2)])?,
            l1.shape().clone(),
        ))
    }
}

/// Each row's dot product `Σⱼ aⱼ bⱼ` of `a` and `b` `[…, d]`, as `[…, 1]` in f32.
pub(crate) struct RowDot;

impl candle_core::CustomOp2 for RowDot {
    fn name(&self) -> &'static str {
        "row-dot"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Element>(a: &[T], b: &[T], d: usize) -> candle_core::Result<Vec<f32>> {
            Ok(a.par_chunks(d)
                .zip(b.par_chunks(d))
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x.get() * y.get()).sum())
                .collect())
        }
        same_shape(l1, l2, "row dot")?;
        let (_, d) = rows(l1)?;
        let dot = per_element!(
            s1.dtype(),
            run(typed(s1, l1, "row dot")?, typed(s2, l2, "row dot")?, d)
        )?;
        Ok((CpuStorage::F32(dot), per_row(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shape(l1, l2, "row dot")?;
        let (count, d) = rows(l1)?;
        let launch = launch::row_dot(s1.dtype(), count, d)?;
        Ok((cuda::run(&launch, &[(s1, l1), (s2, l2)])?, per_row(l1)))
    }
}

/// The input gradient of `softmax(scale · s)`: `scale · p ⊙ (dp − dot)` from the
/// probabilities `p`, their gradient `dp` `[…, n]` and each row's `dot = Σⱼ pⱼ dpⱼ` (f32,
/// `[…, 1]`).
pub(crate) struct SoftmaxGrad(pub(crate) f32);

impl candle_core::CustomOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Element>(
            (p, dp): (&[T], &[T]),
            dot: &[f32],
            n: usize,
            scale: f32,
        ) -> candle_core::Result<CpuStorage> {
            let mut ds = vec![T::put(0.0); p.len()];
            ds.par_chunks_mut(n)
                .zip(p.par_chunks(n).zip(dp.par_chunks(n)))
                .zip(dot.par_iter())
                .for_each(|((ds, (p, dp)), dot)| {
                    for ((o, p), g) in ds.iter_mut().zip(p).zip(dp) {
                        *o = T::put(scale * p.get() * (g.get() - dot));
                    }
                });
            Ok(T::storage(ds))
        }
        same_shape(l1, l2, "softmax")?;
        let (count, n) = rows(l1)?;
        check_per_row(count, l3, "row dot products")?;
        let dot = typed::<f32>(s3, l3, "row dot products")?;
        let ds = per_element!(
            s1.dtype(),
            run(
                (typed(s1, l1, "probabilities")?, typed(s2, l2, "gradient")?),
                dot,
                n,
                self.0
            )
        )?;
        Ok((ds, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shape(l1, l2, "softmax")?;
        let (count, n) = rows(l1)?;
        check_per_row(count, l3, "row dot products")?;
        let launch = launch::softmax_grad(s1.dtype(), l1.shape().elem_count(), n, self.0)?;
        let ds = cuda::run(&launch, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((ds, l1.shape().clone()))
    }
}

/// `softmax(scale · s)` over the last dimension of scores `s` and each row's log-sum-exp
/// (f32, `[…, 1]`): two kernels.
pub(crate) fn softmax_with_logsumexp(
    s: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let s = s.contiguous()?;
    let lse = s.apply_op1_no_bwd(&RowLogSumExp(scale as f32))?;
    let p = probs(&s, &lse, scale)?;
    Ok((p, lse))
}

/// `exp(scale · s − lse)`: the probabilities again from the scores and their log-sum-exp.
pub(crate) fn probs(s: &Tensor, lse: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    s.contiguous()?
        .apply_op2_no_bwd(&lse.contiguous()?, &Probs(scale as f32))
}

/// The input gradient of `o = softmax(scale · s) v` at the scores, from the probabilities
/// `p`, their gradient `dp`, and the output `o` with its gradient `d_o`
/// (`Σⱼ pⱼ dpⱼ = d_o · o` per row): two kernels.
pub(crate) fn softmax_grad(
    p: &Tensor,
    dp: &Tensor,
    (d_o, o): (&Tensor, &Tensor),
    scale: f64,
) -> candle_core::Result<Tensor> {
    let dot = d_o
        .contiguous()?
        .apply_op2_no_bwd(&o.contiguous()?, &RowDot)?;
    p.contiguous()?
        .apply_op3_no_bwd(&dp.contiguous()?, &dot, &SoftmaxGrad(scale as f32))
}

#[cfg(test)]
mod tests {
    //! Each fused op against its layer's tensor formula in f64 on the CPU. The ops run on
    //! `NULLTEXT_TEST_DEVICE` (the CPU, or `cuda` in a CUDA build with a GPU) in f32, f16 and
    //! bf16, with the inputs rounded to the dtype before the reference sees them.

    use candle_core::{DType, Device, Tensor};

    use crate::attention::FeedForward;
    use crate::nn::{GroupNorm, LayerNorm};
    use crate::testing::max_abs_diff;

    fn device() -> Device {
        match std::env::var("NULLTEXT_TEST_DEVICE").as_deref() {
            Ok("cuda") => crate::device::cuda(0).expect("NULLTEXT_TEST_DEVICE=cuda"),
            _ => Device::Cpu,
        }
    }

    /// The dtypes the fused kernels take on `dev`, each with the error allowed relative to
    /// the reference's largest magnitude (a few roundings of the output).
    pub(super) fn dtypes(dev: &Device) -> Vec<(DType, f64)> {
        let single = if dev.is_cpu() { 2e-6 } else { 5e-6 };
        vec![
            (DType::F32, single),
            (DType::F16, 1e-3),
            (DType::BF16, 8e-3),
        ]
    }

    /// Deterministic values in `[mean − span/2, mean + span/2)`.
    pub(super) fn values(n: usize, seed: u64, mean: f64, span: f64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                mean + span * ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
            })
            .collect()
    }

    /// A tensor of `values` in `dtype` on `dev`, and the same rounded values in f64 on the CPU.
    fn pair(v: Vec<f64>, dims: &[usize], dtype: DType, dev: &Device) -> (Tensor, Tensor) {
        let t = Tensor::from_vec(v, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let reference = t.to_dtype(DType::F64).unwrap();
        (t.to_device(dev).unwrap(), reference)
    }

    /// `max |got − want| / max |want|`.
    fn error(got: &Tensor, want: &Tensor) -> f64 {
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        max_abs_diff(got, want) / scale.max(1e-30)
    }

    #[test]
    fn group_norm_and_its_input_gradient_match_the_tensor_formula() {
        let dev = device();
        // 6 groups of 4 channels over a 5×7 plane, with an offset mean (cancellation)
        let (b, c, h, w) = (2, 24, 5, 7);
        for (dtype, tol) in dtypes(&dev) {
            let n = b * c * h * w;
            let (x, x64) = pair(values(n, 1, 3.0, 4.0), &[b, c, h, w], dtype, &dev);
            let (g, g64) = pair(values(n, 2, 0.0, 2.0), &[b, c, h, w], dtype, &dev);
            let (gamma, gamma64) = pair(values(c, 3, 1.0, 1.0), &[c], dtype, &dev);
            let (beta, beta64) = pair(values(c, 4, 0.0, 1.0), &[c], dtype, &dev);
            let norm = GroupNorm::new(gamma, beta, 6, 1e-5);
            let reference = GroupNorm::new(gamma64, beta64, 6, 1e-5);
            assert!(norm.fused_op(&x, true).is_some(), "{dtype:?} on {dev:?}");
            for silu in [false, true] {
                let (y, record) = norm.forward_recording(&x, silu).unwrap();
                assert!(matches!(record, crate::nn::NormRecord::Input(_)));
                let dx = norm.backward(&record, &g, silu).unwrap();
                let (y64, _) = reference.forward_saving(&x64, silu).unwrap();
                let dx64 = reference.input_grad(&x64, &g64, silu).unwrap();
                let (ey, edx) = (error(&y, &y64), error(&dx, &dx64));
                println!("group norm {dtype:?} silu={silu}: value {ey:.2e}, gradient {edx:.2e}");
                assert!(
                    ey < tol && edx < tol,
                    "{dtype:?}: {ey:.2e}, {edx:.2e} ≥ {tol:.0e}"
                );
            }
        }
    }

    #[test]
    fn layer_norm_input_gradient_matches_the_tensor_formula() {
        let dev = device();
        let (rows, d) = (3 * 37, 40);
        for (dtype, tol) in dtypes(&dev) {
            let (x, x64) = pair(values(rows * d, 5, -2.0, 3.0), &[3, 37, d], dtype, &dev);
            let (g, g64) = pair(values(rows * d, 6, 0.0, 2.0), &[3, 37, d], dtype, &dev);
            let (gamma, gamma64) = pair(values(d, 7, 1.0, 1.0), &[d], dtype, &dev);
            let (beta, beta64) = pair(values(d, 8, 0.0, 1.0), &[d], dtype, &dev);
            let eps = 1e-5;
            let norm = LayerNorm {
                weight: gamma,
                bias: beta,
                eps,
            };
            let reference = LayerNorm {
                weight: gamma64,
                bias: beta64,
                eps,
            };
            let e = error(
                &norm.input_grad(&x, &g).unwrap(),
                &reference.input_grad(&x64, &g64).unwrap(),
            );
            println!("layer norm gradient {dtype:?}: {e:.2e}");
            assert!(e < tol, "{dtype:?}: {e:.2e} ≥ {tol:.0e}");
        }
    }

    #[test]
    fn geglu_and_its_input_gradient_match_the_tensor_formula() {
        let dev = device();
        let (rows, inner) = (2 * 29, 24);
        for (dtype, tol) in dtypes(&dev) {
            let (h, h64) = pair(
                values(rows * 2 * inner, 9, 0.0, 8.0),
                &[2, 29, 2 * inner],
                dtype,
                &dev,
            );
            let (g, g64) = pair(
                values(rows * inner, 10, 0.0, 2.0),
                &[2, 29, inner],
                dtype,
                &dev,
            );
            let (ey, edh) = (
                error(
                    &FeedForward::geglu(&h).unwrap(),
                    &FeedForward::geglu(&h64).unwrap(),
                ),
                error(
                    &FeedForward::geglu_grad(&h, &g).unwrap(),
                    &FeedForward::geglu_grad(&h64, &g64).unwrap(),
                ),
            );
            println!("geglu {dtype:?}: value {ey:.2e}, gradient {edh:.2e}");
            assert!(
                ey < tol && edh < tol,
                "{dtype:?}: {ey:.2e}, {edh:.2e} ≥ {tol:.0e}"
            );
        }
    }

    #[test]
    fn attention_steps_match_the_tensor_formulas() {
        let dev = device();
        let (dims, scale) = ([2, 3, 37, 53], 0.3);
        let n: usize = dims.iter().product();
        let row = [2, 3, 37, 1];
        for (dtype, tol) in dtypes(&dev) {
            let (s, s64) = pair(values(n, 11, 1.0, 20.0), &dims, dtype, &dev);
            let (dp, dp64) = pair(values(n, 12, 0.0, 2.0), &dims, dtype, &dev);
            let (o, o64) = pair(
                values(2 * 3 * 37 * 8, 13, 0.0, 2.0),
                &[2, 3, 37, 8],
                dtype,
                &dev,
            );
            let (d_o, d_o64) = pair(
                values(2 * 3 * 37 * 8, 14, 0.0, 2.0),
                &[2, 3, 37, 8],
                dtype,
                &dev,
            );
            let (p, lse) = super::softmax_with_logsumexp(&s, scale).unwrap();
            assert_eq!((lse.dims(), lse.dtype()), (&row[..], DType::F32));
            let scaled = (&s64 * scale).unwrap();
            let m = scaled.max_keepdim(3).unwrap();
            let lse64 = (scaled
                .broadcast_sub(&m)
                .unwrap()
                .exp()
                .unwrap()
                .sum_keepdim(3)
                .unwrap())
            .log()
            .unwrap()
            .add(&m)
            .unwrap();
            let p64 = scaled.broadcast_sub(&lse64).unwrap().exp().unwrap();
            let dot64 = (&d_o64 * &o64).unwrap().sum_keepdim(3).unwrap();
            let ds64 = ((&p64 * dp64.broadcast_sub(&dot64).unwrap()).unwrap() * scale).unwrap();
            // the gradient from the reference probabilities rounded to the dtype, as the
            // kernel receives them
            let p_in = p64.to_dtype(dtype).unwrap();
            let ds = super::softmax_grad(&p_in.to_device(&dev).unwrap(), &dp, (&d_o, &o), scale)
                .unwrap();
            let ds_ref = ((&p_in.to_dtype(DType::F64).unwrap()
                * dp64.broadcast_sub(&dot64).unwrap())
            .unwrap()
                * scale)
                .unwrap();
            let errs = [
                error(&lse, &lse64),
                error(&p, &p64),
                error(&ds, &ds_ref),
                error(&super::probs(&s, &lse, scale).unwrap(), &p64),
            ];
            let shown = errs.map(|e| format!("{e:.2e}"));
            println!(
                "attention steps {dtype:?}: lse, probs, softmax gradient, probs again {shown:?}"
            );
            assert!(
                errs.iter().all(|e| *e < tol),
                "{dtype:?}: {errs:?} ≥ {tol:.0e}"
            );
            // and from the exact probabilities, through their rounding to the dtype
            assert!(error(&ds, &ds64) < 50.0 * tol);
        }
    }

    #[test]
    fn the_fused_ops_refuse_mismatched_arguments() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 8, 2, 2), DType::F32, &dev).unwrap();
        let affine = Tensor::zeros(12, DType::F32, &dev).unwrap();
        let op = super::GroupNormOp {
            groups: 4,
            eps: 1e-5,
            silu: false,
        };
        let e = op.input_grad(&x, &x, &affine).unwrap_err().to_string();
        assert!(e.contains("8 channels in 4 groups"), "{e}");
        let short = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let e = op.input_grad(&x, &x, &short).unwrap_err().to_string();
        assert!(e.contains("affine parameters of [2, 2]"), "{e}");
        let g = Tensor::zeros((1, 8, 2, 3), DType::F32, &dev).unwrap();
        let affine = Tensor::zeros(16, DType::F32, &dev).unwrap();
        let e = op.input_grad(&x, &g, &affine).unwrap_err().to_string();
        assert!(e.contains("gradient of shape [1, 8, 2, 3]"), "{e}");
        let odd = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let e = odd.apply_op1(super::GegluOp).unwrap_err().to_string();
        assert!(e.contains("width 5"), "{e}");
        // f64 takes candle's tensor ops
        assert!(super::applies(&x));
        assert!(super::applies(&x.to_dtype(DType::F16).unwrap()));
        assert!(!super::applies(&x.to_dtype(DType::F64).unwrap()));
    }
}
