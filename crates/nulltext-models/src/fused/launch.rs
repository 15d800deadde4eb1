//! The launches of the CUDA kernels in `kernels.cu`, described without a GPU: which kernel,
//! on how many blocks of how many threads, with which arguments in the kernel's order.
//! `cuda.rs` carries a launch out on a GPU; the tests carry the same launch out on the CPU,
//! through the host build of the same kernels (`emulator/`).

use candle_core::{DType, Result};

use super::GroupNormOp;

/// Threads per block of the norms (one block per group or row).
const NORM_THREADS: u32 = 512;
/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

/// One argument of a kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Arg {
    /// The op's `n`-th input (contiguous), as a pointer.
    Input(usize),
    /// The launch's output, as a pointer.
    Output,
    I32(i32),
    I64(i64),
    F32(f32),
}

/// One kernel launch: its output is a fresh buffer of `output.0` elements of `output.1`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Launch {
    /// The kernel's name in the PTX: `nt_<name>_<dtype>`.
    pub(super) kernel: String,
    pub(super) blocks: u32,
    pub(super) threads: u32,
    pub(super) args: Vec<Arg>,
    pub(super) output: (usize, DType),
}

impl Launch {
    /// Kernel `name` for inputs of `dtype` (f32, f16 or bf16), on `blocks` blocks of
    /// `threads`.
    fn new(name: &str, dtype: DType, blocks: usize, threads: u32) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!("the fused kernels take f32, f16 or bf16, not {dtype:?}");
        }
        Ok(Self {
            kernel: format!("nt_{name}_{}", dtype.as_str()),
            blocks: u32::try_from(blocks.max(1))
                .map_err(|_| candle_core::Error::Msg(format!("{blocks} blocks for {name}")))?,
            threads,
            args: Vec::new(),
            output: (0, dtype),
        })
    }

    /// One thread per element of `count`.
    fn elementwise(name: &str, dtype: DType, count: usize) -> Result<Self> {
        Self::new(name, dtype, count.div_ceil(THREADS as usize), THREADS)
    }

    fn args(mut self, args: impl IntoIterator<Item = Arg>) -> Self {
        self.args.extend(args);
        self
    }

    fn output(mut self, len: usize, dtype: DType) -> Self {
        self.output = (len, dtype);
        self
    }
}

fn int(v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| candle_core::Error::Msg(format!("{v} exceeds a kernel's int")))
}

fn long(v: usize) -> Arg {
    Arg::I64(v as i64)
}

use Arg::{Input, Output, F32};

/// Group norm (with `op.silu`, the SiLU after it) of `n` values with `c` channels of `hw`
/// each: inputs x, γ, β; one block per (image, group).
pub(super) fn group_norm(
    dtype: DType,
    op: &GroupNormOp,
    n: usize,
    c: usize,
    hw: usize,
) -> Result<Launch> {
    group_norm_kernel("group_norm", dtype, op, n, c, hw)
}

/// [`group_norm`]'s input gradient: inputs x, the output gradient and `[γ | β]`.
pub(super) fn group_norm_backward(
    dtype: DType,
    op: &GroupNormOp,
    n: usize,
    c: usize,
    hw: usize,
) -> Result<Launch> {
    group_norm_kernel("group_norm_backward", dtype, op, n, c, hw)
}

/// The launch both group-norm kernels share: three inputs, then the shape and `op`.
fn group_norm_kernel(
    name: &str,
    dtype: DType,
    op: &GroupNormOp,
    n: usize,
    c: usize,
    hw: usize,
) -> Result<Launch> {
    let blocks = n / (c / op.groups * hw).max(1);
    Ok(Launch::new(name, dtype, blocks, NORM_THREADS)?
        .args([Input(0), Input(1), Input(2), Output])
        .args([int(c)?, int(hw)?, int(op.groups)?])
        .args([F32(op.eps as f32), Arg::I32(op.silu as i32)])
        .output(n, dtype))
}

/// Layer norm's input gradient over `n` values in rows of width `d`: inputs x, the output
/// gradient and γ; one block per row.
pub(super) fn layer_norm_backward(dtype: DType, eps: f64, n: usize, d: usize) -> Result<Launch> {
    Ok(
        Launch::new("layer_norm_backward", dtype, n / d.max(1), THREADS)?
            .args([
                Input(0),
                Input(1),
                Input(2),
                Output,
                int(d)?,
                F32(eps as f32),
            ])
            .output(n, dtype),
    )
}

/// GEGLU of rows `[a | b]` of width `2·inner`, `count` outputs: input h.
pub(super) fn geglu(dtype: DType, count: usize, inner: usize) -> Result<Launch> {
    Ok(Launch::elementwise("geglu", dtype, count)?
        .args([Input(0), Output, long(count), int(inner)?])
        .output(count, dtype))
}

/// [`geglu`]'s input gradient for `count` output gradients: inputs h and the gradient.
pub(super) fn geglu_backward(dtype: DType, count: usize, inner: usize) -> Result<Launch> {
    Ok(Launch::elementwise("geglu_backward", dtype, count)?
        .args([Input(0), Input(1), Output, long(count), int(inner)?])
        .output(2 * count, dtype))
}

/// Each row's log-sum-exp of `scale ·` scores, rows of width `n`, in f32: input the
/// scores; one block per row.
pub(super) fn row_logsumexp(dtype: DType, rows: usize, n: usize, scale: f32) -> Result<Launch> {
    let threads = if n <= 256 { 64 } else { NORM_THREADS };
    Ok(Launch::new("row_logsumexp", dtype, rows, threads)?
        .args([Input(0), Output, int(n)?, F32(scale)])
        .output(rows, DType::F32))
}

/// The probabilities from `count` scores in rows of width `n`: inputs the scores and their
/// rows' log-sum-exp (f32).
pub(super) fn probs(dtype: DType, count: usize, n: usize, scale: f32) -> Result<Launch> {
    Ok(Launch::elementwise("probs", dtype, count)?
        .args([Input(0), Input(1), Output, long(count), int(n)?, F32(scale)])
        .output(count, dtype))
}

/// Each row's dot product of two inputs (rows of width `d`), in f32; one warp per row.
pub(super) fn row_dot(dtype: DType, rows: usize, d: usize) -> Result<Launch> {
    Ok(Launch::elementwise("row_dot", dtype, rows * 32)?
        .args([Input(0), Input(1), Output, long(rows), int(d)?])
        .output(rows, DType::F32))
}

/// The softmax's input gradient for `count` probabilities in rows of width `n`: inputs the
/// probabilities, their gradient and each row's dot product (f32).
pub(super) fn softmax_grad(dtype: DType, count: usize, n: usize, scale: f32) -> Result<Launch> {
    Ok(Launch::elementwise("softmax_grad", dtype, count)?
        .args([Input(0), Input(1), Input(2), Output])
        .args([long(count), int(n)?, F32(scale)])
        .output(count, dtype))
}
