//! Element-wise and layout operations of the UNet's traversal on tensors: on the CPU in f32,
//! without a graph to record, multi-threaded host loops; elsewhere candle's ops (which
//! candle's autograd can differentiate). Both give the same values bit for bit: these
//! operations only move, copy or add numbers.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Elements per parallel task of the host loops.
const CHUNK: usize = 1 << 14;

/// Whether `t` takes the host loops: f32 on the CPU, no graph to record.
pub(crate) fn host(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op()
}

/// Runs `f` on the data of an f32 CPU tensor, borrowed when it is contiguous.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, e))) => Ok(f(&v[a..e])),
        _ => candle_core::bail!("host kernel: an f32 tensor on the CPU expected"),
    }
}

fn from_host(v: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// `a + b` (same shapes).
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(host(a) && host(b)) || a.dims() != b.dims() {
        return Ok((a + b)?);
    }
    let out = with_f32(a, |a| {
        with_f32(b, |b| {
            let mut out = vec![0f32; a.len()];
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(o, (x, y))| {
                    for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                        *o = *x + *y;
                    }
                });
            out
        })
    })??;
    from_host(out, a.dims())
}

/// `x` `[B, C, H, W]` plus a per-row, per-channel bias `[B, C, 1, 1]`.
pub(crate) fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !(host(x) && host(bias)) {
        return Ok(x.broadcast_add(bias)?);
    }
    let (_, _, h, w) = x.dims4()?;
    let out = with_f32(x, |x| {
        with_f32(bias, |bias| {
            let mut out = x.to_vec();
            out.par_chunks_mut(h * w)
                .zip(bias.par_iter())
                .for_each(|(p, v)| p.iter_mut().for_each(|e| *e += v));
            out
        })
    })??;
    from_host(out, x.dims())
}

/// `[n, rows, cols]` → `[n, cols, rows]`, in cache-sized tiles.
fn transpose(x: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; x.len()];
    if !cols.is_multiple_of(T) {
        // tiles of output rows would straddle two matrices
        for m in 0..n {
            let src = &x[m * rows * cols..(m + 1) * rows * cols];
            let dst = &mut out[m * rows * cols..(m + 1) * rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
        return out;
    }
    out.par_chunks_mut(rows * T).enumerate().for_each(|(i, o)| {
        // output rows [c0, c0 + T) of matrix `m`
        let per = cols / T;
        let (m, c0) = (i / per, (i % per) * T);
        let src = &x[m * rows * cols..(m + 1) * rows * cols];
        for r0 in (0..rows).step_by(T) {
            for c in 0..T {
                for r in r0..(r0 + T).min(rows) {
                    o[c * rows + r] = src[r * cols + c0 + c];
                }
            }
        }
    });
    out
}

/// `[B, C, H, W]` → `[B, H·W, C]`.
pub(crate) fn to_seq(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !host(x) {
        return Ok(x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?);
    }
    let out = with_f32(x, |x| transpose(x, b, c, h * w))?;
    from_host(out, &[b, h * w, c])
}

/// `[B, H·W, C]` → `[B, C, H, W]`.
pub(crate) fn to_img(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    if !host(x) {
        return Ok(x
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?);
    }
    let out = with_f32(x, |x| transpose(x, b, h * w, c))?;
    from_host(out, &[b, c, h, w])
}

/// `[B, L, heads·d]` → `[B, heads, L, d]`.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, inner) = x.dims3()?;
    let d = inner / heads;
    if !host(x) {
        return Ok(x.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?);
    }
    let out = with_f32(x, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(l * d).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / heads, bh % heads);
            for (i, row) in o.chunks_mut(d).enumerate() {
                let s = (bi * l + i) * inner + h * d;
                row.copy_from_slice(&x[s..s + d]);
            }
        });
        out
    })?;
    from_host(out, &[b, heads, l, d])
}

/// `[B, heads, L, d]` → `[B, L, heads·d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, l, d) = x.dims4()?;
    if !host(x) {
        return Ok(x.transpose(1, 2)?.reshape((b, l, heads * d))?);
    }
    let out = with_f32(x, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(heads * d)
            .enumerate()
            .for_each(|(bl, o)| {
                let (bi, i) = (bl / l, bl % l);
                for (h, row) in o.chunks_mut(d).enumerate() {
                    let s = ((bi * heads + h) * l + i) * d;
                    row.copy_from_slice(&x[s..s + d]);
                }
            });
        out
    })?;
    from_host(out, &[b, l, heads * d])
}

/// `[B, C1, H, W]` and `[B, C2, H, W]` → `[B, C1 + C2, H, W]`.
pub(crate) fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(host(a) && host(b)) {
        return Ok(Tensor::cat(&[a, b], 1)?);
    }
    let (batch, ca, h, w) = a.dims4()?;
    let cb = b.dim(1)?;
    let (na, nb) = (ca * h * w, cb * h * w);
    let out = with_f32(a, |a| {
        with_f32(b, |b| {
            let mut out = vec![0f32; batch * (na + nb)];
            out.par_chunks_mut(na + nb).enumerate().for_each(|(i, o)| {
                o[..na].copy_from_slice(&a[i * na..(i + 1) * na]);
                o[na..].copy_from_slice(&b[i * nb..(i + 1) * nb]);
            });
            out
        })
    })??;
    from_host(out, &[batch, ca + cb, h, w])
}

/// The inverse of [`cat_channels`] for a gradient: its first `c` channels and the rest.
pub(crate) fn split_channels(g: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let (batch, total, h, w) = g.dims4()?;
    if !host(g) {
        return Ok((
            g.narrow(1, 0, c)?.contiguous()?,
            g.narrow(1, c, total - c)?.contiguous()?,
        ));
    }
    let (na, nb) = (c * h * w, (total - c) * h * w);
    let (a, b) = with_f32(g, |g| {
        let mut a = vec![0f32; batch * na];
        let mut b = vec![0f32; batch * nb];
        for (i, row) in g.chunks(na + nb).enumerate() {
            a[i * na..(i + 1) * na].copy_from_slice(&row[..na]);
            b[i * nb..(i + 1) * nb].copy_from_slice(&row[na..]);
        }
        (a, b)
    })?;
    Ok((
        from_host(a, &[batch, c, h, w])?,
        from_host(b, &[batch, total - c, h, w])?,
    ))
}

/// Nearest-neighbour source indices of `dst` positions over `src` (candle's rule for
/// `upsample_nearest2d`).
fn nearest(src: usize, dst: usize) -> Vec<usize> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| usize::min(src - 1, (i as f64 * scale) as usize))
        .collect()
}

/// Nearest-neighbour upsampling of `[B, C, H, W]` to `to`.
pub(crate) fn upsample(x: &Tensor, (th, tw): (usize, usize)) -> Result<Tensor> {
    if !host(x) {
        return Ok(x.upsample_nearest2d(th, tw)?);
    }
    let (b, c, h, w) = x.dims4()?;
    let (hi, wi) = (nearest(h, th), nearest(w, tw));
    let out = with_f32(x, |x| {
        let mut out = vec![0f32; b * c * th * tw];
        out.par_chunks_mut(th * tw)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, p)| {
                for (r, &sr) in hi.iter().enumerate() {
                    for (col, &sc) in wi.iter().enumerate() {
                        o[r * tw + col] = p[sr * w + sc];
                    }
                }
            });
        out
    })?;
    from_host(out, &[b, c, th, tw])
}

/// The adjoint of [`upsample`] from `(h, w)`: each source pixel collects the gradients of
/// its copies.
pub(crate) fn upsample_grad(g: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (b, c, th, tw) = g.dims4()?;
    let (hi, wi) = (nearest(h, th), nearest(w, tw));
    if !host(g) {
        if th == 2 * h && tw == 2 * w {
            return Ok(g.reshape((b, c, h, 2, w, 2))?.sum((3, 5))?);
        }
        let dev = g.device();
        let idx = |v: &[usize]| -> Result<Tensor> {
            let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
            let n = v.len();
            Ok(Tensor::from_vec(v, n, dev)?)
        };
        let rows = Tensor::zeros((b, c, h, tw), g.dtype(), dev)?.index_add(&idx(&hi)?, g, 2)?;
        let out = Tensor::zeros((b, c, h, w), g.dtype(), dev)?.index_add(&idx(&wi)?, &rows, 3)?;
        return Ok(out);
    }
    let out = with_f32(g, |g| {
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(th * tw))
            .for_each(|(o, p)| {
                for (r, &sr) in hi.iter().enumerate() {
                    for (col, &sc) in wi.iter().enumerate() {
                        o[sr * w + sc] += p[r * tw + col];
                    }
                }
            });
        out
    })?;
    from_host(out, &[b, c, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;

    fn ramp(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }

    /// The host loops give candle's values (a variable takes candle's ops).
    #[test]
    fn host_loops_match_candle() {
        let graph = |t: &Tensor| {
            candle_core::Var::from_tensor(t)
                .unwrap()
                .as_tensor()
                .clone()
        };
        for dims in [[2, 64, 4, 8], [1, 6, 3, 5]] {
            let x = ramp(&dims);
            same(&to_seq(&x).unwrap(), &to_seq(&graph(&x)).unwrap());
            let s = to_seq(&x).unwrap();
            same(&to_img(&s, (dims[2], dims[3])).unwrap(), &x);
            same(
                &to_img(&s, (dims[2], dims[3])).unwrap(),
                &to_img(&graph(&s), (dims[2], dims[3])).unwrap(),
            );
            let bias = ramp(&[dims[0], dims[1], 1, 1]);
            same(
                &add_bias(&x, &bias).unwrap(),
                &add_bias(&graph(&x), &bias).unwrap(),
            );
            same(&add(&x, &x).unwrap(), &add(&graph(&x), &x).unwrap());
        }
        let (a, b) = (ramp(&[2, 3, 4, 5]), ramp(&[2, 6, 4, 5]));
        let cat = cat_channels(&a, &b).unwrap();
        same(&cat, &cat_channels(&graph(&a), &b).unwrap());
        let (da, db) = split_channels(&cat, 3).unwrap();
        same(&da, &a);
        same(&db, &b);
        for to in [(8, 10), (9, 7)] {
            same(
                &upsample(&a, to).unwrap(),
                &upsample(&graph(&a), to).unwrap(),
            );
        }
        let seq = ramp(&[2, 12, 6]);
        let heads = split_heads(&seq, 3).unwrap();
        same(&heads, &split_heads(&graph(&seq), 3).unwrap());
        same(&merge_heads(&heads).unwrap(), &seq);
        for (from, to) in [((4, 6), (8, 12)), ((7, 5), (13, 11))] {
            let g = ramp(&[2, 3, to.0, to.1]);
            let f64_grad = upsample_grad(&g.to_dtype(DType::F64).unwrap(), from).unwrap();
            let host_grad = upsample_grad(&g, from).unwrap();
            let d = max_abs_diff(&host_grad, &f64_grad);
            assert!(d < 1e-6, "{d}");
        }
    }
}
