//! The CUDA kernels of `kernels.cu` on the CPU, for the tests: `emulator/` builds them with
//! the host's C++ compiler (`$CXX`, else `c++`) as they are written, with CUDA's built-ins
//! on host threads (`emulator/host.h`), and runs a [`Launch`] — the very description
//! `cuda.rs` carries out on a GPU — on CPU tensors, under the address and undefined-behavior
//! sanitizers. The tests below check each kernel, for f32, f16 and bf16, against the op's
//! CPU implementation (itself checked against f64 formulas), so that a GPU runs kernels
//! whose indexing, bounds, reductions and launch configurations have run before.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, Shape, Tensor};

use super::launch::{Arg, Launch};

/// The emulator's binary, built once per test run.
fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fused/emulator");
        let out = Path::new(env!("OUT_DIR")).join("kernels-emulator");
        let tmp = out.with_extension(format!("{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        // with the address and undefined-behavior sanitizers: a read or write out of a
        // buffer's bounds fails the launch
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-g", "-pthread", "-Wall"])
            .args(["-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
            .arg("-I")
            .arg(&dir)
            .arg(dir.join("driver.cpp"))
            .arg("-o")
            .arg(&tmp)
            .status()
            .unwrap_or_else(|e| {
                panic!("the CUDA kernels' CPU tests need a C++20 compiler ({cxx}: {e}); install g++ or set CXX")
            });
        assert!(status.success(), "{cxx} failed on the kernels' host build");
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// The little-endian bytes of a CPU tensor's values.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => (t.to_vec1::<half::f16>().unwrap().iter())
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => (t.to_vec1::<half::bf16>().unwrap().iter())
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        dt => panic!("no kernel takes {dt:?}"),
    }
}

/// A CPU tensor of `shape` from little-endian bytes of `dtype`.
fn tensor(b: &[u8], dtype: DType, shape: Shape) -> Tensor {
    let dev = &Device::Cpu;
    let pairs = || b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    match dtype {
        DType::F32 => {
            let v = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            Tensor::from_vec(v.collect::<Vec<_>>(), shape, dev)
        }
        DType::F16 => Tensor::from_vec(pairs().map(half::f16::from_bits).collect(), shape, dev),
        DType::BF16 => Tensor::from_vec(pairs().map(half::bf16::from_bits).collect(), shape, dev),
        dt => panic!("no kernel writes {dt:?}"),
    }
    .unwrap()
}

/// Runs `launch` on `inputs` (contiguous CPU tensors) and returns its output as `shape`.
pub(super) fn run(launch: &Launch, inputs: &[&Tensor], shape: impl Into<Shape>) -> Tensor {
    let mut msg = Vec::new();
    let u32le = |v: usize| u32::try_from(v).unwrap().to_le_bytes();
    msg.extend(u32le(launch.kernel.len()));
    msg.extend(launch.kernel.as_bytes());
    msg.extend(launch.blocks.to_le_bytes());
    msg.extend(launch.threads.to_le_bytes());
    msg.extend(u32le(launch.args.len()));
    let (len, dtype) = launch.output;
    for arg in &launch.args {
        match *arg {
            Arg::Input(i) => {
                let b = bytes(inputs[i]);
                msg.push(0);
                msg.extend((b.len() as u64).to_le_bytes());
                msg.extend(b);
            }
            Arg::I32(v) => {
                msg.push(1);
                msg.extend(v.to_le_bytes());
            }
            Arg::I64(v) => {
                msg.push(2);
                msg.extend(v.to_le_bytes());
            }
            Arg::F32(v) => {
                msg.push(3);
                msg.extend(v.to_le_bytes());
            }
            Arg::Output => {
                msg.push(4);
                msg.extend(((len * dtype.size_in_bytes()) as u64).to_le_bytes());
            }
        }
    }
    let mut child = Command::new(binary())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&msg).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}: {:?}", launch.kernel, out.status);
    tensor(&out.stdout, dtype, shape.into())
}

mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::run;
    use crate::fused::launch;
    use crate::fused::tests::{dtypes, values};
    use crate::fused::{
        stacked_affine, GegluGrad, GegluOp, GroupNormGrad, GroupNormOp, LayerNormGrad, Probs,
        RowDot, RowLogSumExp, SoftmaxGrad,
    };
    use crate::testing::max_abs_diff;

    fn input(n: usize, seed: u64, mean: f64, span: f64, dims: &[usize], dtype: DType) -> Tensor {
        (Tensor::from_vec(values(n, seed, mean, span), dims, &Device::Cpu).unwrap())
            .to_dtype(dtype)
            .unwrap()
    }

    /// Asserts that the kernel's output matches the CPU implementation's within `tol`
    /// relative to the largest magnitude (and has no NaN: an unwritten element is NaN).
    fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
        assert_eq!(
            (got.dims(), got.dtype()),
            (want.dims(), want.dtype()),
            "{what}"
        );
        let scale = (want.to_dtype(DType::F64).unwrap().abs().unwrap())
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let e = max_abs_diff(got, want) / scale.max(1e-30);
        println!("{what}: {e:.2e}");
        assert!(e < tol, "{what}: {e:.2e} ≥ {tol:.0e}");
    }

    #[test]
    fn the_norm_kernels_match_the_cpu_implementations() {
        // groups smaller and larger than a block's 512 threads
        for (dims, groups) in [([2, 24, 5, 7], 6), ([1, 8, 33, 31], 2)] {
            let (c, hw) = (dims[1], dims[2] * dims[3]);
            let n: usize = dims.iter().product();
            for (dtype, tol) in dtypes(&Device::Cpu) {
                let x = input(n, 1, 3.0, 4.0, &dims, dtype);
                let dy = input(n, 2, 0.0, 2.0, &dims, dtype);
                let gamma = input(c, 3, 1.0, 1.0, &[c], dtype);
                let beta = input(c, 4, 0.0, 1.0, &[c], dtype);
                let affine = stacked_affine(&gamma, &beta).unwrap();
                for silu in [false, true] {
                    let op = GroupNormOp {
                        groups,
                        eps: 1e-5,
                        silu,
                    };
                    let what = format!("group norm {dims:?}/{groups} {dtype:?} silu={silu}");
                    let y = run(
                        &launch::group_norm(dtype, &op, n, c, hw).unwrap(),
                        &[&x, &gamma, &beta],
                        &dims,
                    );
                    let want = x.apply_op3_no_bwd(&gamma, &beta, &op).unwrap();
                    check(&what, &y, &want, tol);
                    let dx = run(
                        &launch::group_norm_backward(dtype, &op, n, c, hw).unwrap(),
                        &[&x, &dy, &affine],
                        &dims,
                    );
                    let want = x
                        .apply_op3_no_bwd(&dy, &affine, &GroupNormGrad(op))
                        .unwrap();
                    check(&format!("{what} gradient"), &dx, &want, tol);
                }
            }
        }
        // rows narrower and wider than a block's 256 threads
        for d in [40, 1000] {
            let dims = [3, 7, d];
            let n = 21 * d;
            for (dtype, tol) in dtypes(&Device::Cpu) {
                let x = input(n, 5, -2.0, 3.0, &dims, dtype);
                let dy = input(n, 6, 0.0, 2.0, &dims, dtype);
                let gamma = input(d, 7, 1.0, 1.0, &[d], dtype);
                let dx = run(
                    &launch::layer_norm_backward(dtype, 1e-5, n, d).unwrap(),
                    &[&x, &dy, &gamma],
                    &dims,
                );
                let want = x
                    .apply_op3_no_bwd(&dy, &gamma, &LayerNormGrad(1e-5))
                    .unwrap();
                check(
                    &format!("layer norm gradient d={d} {dtype:?}"),
                    &dx,
                    &want,
                    tol,
                );
            }
        }
    }

    #[test]
    fn the_geglu_kernels_match_the_cpu_implementations() {
        let (rows, inner) = (2 * 29, 40);
        for (dtype, tol) in dtypes(&Device::Cpu) {
            let h = input(rows * 2 * inner, 9, 0.0, 6.0, &[2, 29, 2 * inner], dtype);
            let g = input(rows * inner, 10, 0.0, 2.0, &[2, 29, inner], dtype);
            let y = run(
                &launch::geglu(dtype, rows * inner, inner).unwrap(),
                &[&h],
                g.shape(),
            );
            check(
                &format!("geglu {dtype:?}"),
                &y,
                &h.apply_op1_no_bwd(&GegluOp).unwrap(),
                tol,
            );
            let dh = run(
                &launch::geglu_backward(dtype, rows * inner, inner).unwrap(),
                &[&h, &g],
                h.shape(),
            );
            let want = h.apply_op2_no_bwd(&g, &GegluGrad).unwrap();
            check(&format!("geglu gradient {dtype:?}"), &dh, &want, tol);
        }
    }

    #[test]
    fn the_attention_kernels_match_the_cpu_implementations() {
        // rows of up to 256 scores take 64 threads, longer ones 512; 10 rows of row dot
        // products leave the last block's last warps idle
        let scale = 0.3f32;
        for n in [77, 1000] {
            let (dims, rows) = ([1, 2, 5, n], 10);
            let row = [1, 2, 5, 1];
            for (dtype, tol) in dtypes(&Device::Cpu) {
                let s = input(rows * n, 11, 1.0, 20.0, &dims, dtype);
                let what = format!("{n} keys {dtype:?}");
                let lse = run(
                    &launch::row_logsumexp(dtype, rows, n, scale).unwrap(),
                    &[&s],
                    &row,
                );
                let lse_cpu = s.apply_op1_no_bwd(&RowLogSumExp(scale)).unwrap();
                check(&format!("log-sum-exp {what}"), &lse, &lse_cpu, tol);
                let p = run(
                    &launch::probs(dtype, rows * n, n, scale).unwrap(),
                    &[&s, &lse_cpu],
                    &dims,
                );
                let p_cpu = s.apply_op2_no_bwd(&lse_cpu, &Probs(scale)).unwrap();
                check(&format!("probabilities {what}"), &p, &p_cpu, tol);
                let d = 40;
                let o = input(rows * d, 13, 0.0, 2.0, &[1, 2, 5, d], dtype);
                let d_o = input(rows * d, 14, 0.0, 2.0, &[1, 2, 5, d], dtype);
                let dot = run(&launch::row_dot(dtype, rows, d).unwrap(), &[&d_o, &o], &row);
                let dot_cpu = d_o.apply_op2_no_bwd(&o, &RowDot).unwrap();
                check(&format!("row dot {dtype:?}"), &dot, &dot_cpu, tol);
                let dp = input(rows * n, 12, 0.0, 2.0, &dims, dtype);
                let ds = run(
                    &launch::softmax_grad(dtype, rows * n, n, scale).unwrap(),
                    &[&p_cpu, &dp, &dot_cpu],
                    &dims,
                );
                let want = p_cpu
                    .apply_op3_no_bwd(&dp, &dot_cpu, &SoftmaxGrad(scale))
                    .unwrap();
                check(&format!("softmax gradient {what}"), &ds, &want, tol);
            }
        }
    }
}
