//! `softmax(s·Q Kᵀ) V` on the CPU (f32) without materializing the probabilities.
//!
//! Work is split into blocks of query rows small enough that a block's scores (all keys)
//! stay in the processor's cache: each block computes its scores, their exact softmax and its
//! share of the output, independently and in parallel. The backward pass recomputes every
//! block's probabilities (nothing of size `Lq × Lk` is kept between the passes) and runs one
//! task per batch·head, which owns that head's key and value gradients.

use rayon::prelude::*;

use crate::cpu::conv::matmul_serial;
use crate::cpu::kernels::{exp_row, exp_shifted_row};

/// Score elements per block of the forward pass (4 MiB of f32: fewer, larger blocks
/// amortize packing the keys for the product; measured 157 ms against 213 ms for 256 KiB
/// blocks on SD's 8 × 4096² self-attention, 2 cores).
const FORWARD_BLOCK: usize = 1 << 20;
/// Score elements per block of the backward pass, which holds two such buffers (1 MiB each).
const BACKWARD_BLOCK: usize = 1 << 18;

/// Shapes: `q` `[bh, lq, d]`, `k` `[bh, lk, d]`, `v` `[bh, lk, dv]`, all contiguous.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

impl AttnDims {
    /// Query rows per forward block: [`FORWARD_BLOCK`] scores, yet at least four blocks
    /// per thread when the attention is small.
    fn block_rows(&self) -> usize {
        let per_thread = (self.bh * self.lq).div_ceil(4 * rayon::current_num_threads());
        (FORWARD_BLOCK / self.lk.max(1))
            .min(per_thread)
            .clamp(1, self.lq.max(1))
    }

    fn bwd_block_rows(&self) -> usize {
        (BACKWARD_BLOCK / self.lk.max(1)).clamp(1, self.lq.max(1))
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        assert_eq!(q.len(), self.bh * self.lq * self.d);
        assert_eq!(k.len(), self.bh * self.lk * self.d);
        assert_eq!(v.len(), self.bh * self.lk * self.dv);
    }
}

/// The attention output `[bh, lq, dv]` and the log-sum-exp of every query's scaled scores
/// `[bh, lq]` (what [`backward`] needs to recompute the probabilities in one pass).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], n: AttnDims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    n.check(q, k, v);
    let mut out = vec![0f32; n.bh * n.lq * n.dv];
    let mut lse = vec![0f32; n.bh * n.lq];
    let rows = n.block_rows();
    out.par_chunks_mut(n.lq * n.dv)
        .zip(lse.par_chunks_mut(n.lq))
        .enumerate()
        .flat_map_iter(|(h, (oh, lh))| {
            oh.chunks_mut(rows * n.dv)
                .zip(lh.chunks_mut(rows))
                .enumerate()
                .map(move |(i, (ob, lb))| (h, i, ob, lb))
        })
        .for_each_init(
            || vec![0f32; rows * n.lk + rows],
            |scores, (h, i, ob, lb)| {
                let r0 = i * rows;
                let m = lb.len();
                let qb = &q[(h * n.lq + r0) * n.d..(h * n.lq + r0 + m) * n.d];
                let kh = &k[h * n.lk * n.d..(h + 1) * n.lk * n.d];
                let vh = &v[h * n.lk * n.dv..(h + 1) * n.lk * n.dv];
                let (s, sums) = scores.split_at_mut(rows * n.lk);
                let s = &mut s[..m * n.lk];
                scores_block(qb, kh, s, m, n);
                for ((row, l), sum) in s.chunks_mut(n.lk).zip(lb.iter_mut()).zip(sums.iter_mut()) {
                    (*sum, *l) = exp_row(row, scale);
                }
                // O = P V, with P's normalization applied to O's rows
                matmul_serial(
                    (m, n.dv, n.lk),
                    (ob, n.dv, false),
                    (s, (n.lk, 1)),
                    (vh, (n.dv, 1)),
                );
                for (orow, sum) in ob.chunks_mut(n.dv).zip(sums.iter()) {
                    let inv = 1.0 / sum;
                    orow.iter_mut().for_each(|o| *o *= inv);
                }
            },
        );
    (out, lse)
}

/// `s` ← Q_b Kᵀ for `m` query rows.
fn scores_block(qb: &[f32], kh: &[f32], s: &mut [f32], m: usize, n: AttnDims) {
    matmul_serial(
        (m, n.lk, n.d),
        (s, n.lk, false),
        (qb, (n.d, 1)),
        (kh, (1, n.d)),
    );
}

/// Gradients `(dq, dk, dv)` of the attention given the output gradient `g` `[bh, lq, dv]`.
/// `o` and `lse` are [`forward`]'s results.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    g: &[f32],
    n: AttnDims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    n.check(q, k, v);
    assert_eq!(g.len(), n.bh * n.lq * n.dv);
    assert_eq!(o.len(), g.len());
    assert_eq!(lse.len(), n.bh * n.lq);
    // Σⱼ dPᵢⱼ Pᵢⱼ = Σ_c dOᵢ_c Oᵢ_c: one value per query, from the output instead of the
    // probabilities
    let dots: Vec<f32> = g
        .par_chunks(n.dv.max(1))
        .zip(o.par_chunks(n.dv.max(1)))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dvv = vec![0f32; v.len()];
    let rows = n.bwd_block_rows();
    dq.par_chunks_mut(n.lq * n.d)
        .zip(dk.par_chunks_mut(n.lk * n.d))
        .zip(dvv.par_chunks_mut(n.lk * n.dv))
        .enumerate()
        .for_each(|(h, ((dqh, dkh), dvh))| {
            let qh = &q[h * n.lq * n.d..(h + 1) * n.lq * n.d];
            let kh = &k[h * n.lk * n.d..(h + 1) * n.lk * n.d];
            let vh = &v[h * n.lk * n.dv..(h + 1) * n.lk * n.dv];
            let gh = &g[h * n.lq * n.dv..(h + 1) * n.lq * n.dv];
            let mut p = vec![0f32; rows * n.lk];
            let mut dp = vec![0f32; rows * n.lk];
            for r0 in (0..n.lq).step_by(rows) {
                let m = rows.min(n.lq - r0);
                let qb = &qh[r0 * n.d..(r0 + m) * n.d];
                let gb = &gh[r0 * n.dv..(r0 + m) * n.dv];
                let (p, dp) = (&mut p[..m * n.lk], &mut dp[..m * n.lk]);
                // P = e^(s·Q Kᵀ − lse), the forward's probabilities, in one pass
                scores_block(qb, kh, p, m, n);
                let lb = &lse[h * n.lq + r0..h * n.lq + r0 + m];
                for (row, l) in p.chunks_mut(n.lk).zip(lb) {
                    exp_shifted_row(row, scale, *l);
                }
                // dV += Pᵀ dO
                matmul_serial(
                    (n.lk, n.dv, m),
                    (dvh, n.dv, true),
                    (p, (1, n.lk)),
                    (gb, (n.dv, 1)),
                );
                // dP = dO Vᵀ
                matmul_serial(
                    (m, n.lk, n.dv),
                    (dp, n.lk, false),
                    (gb, (n.dv, 1)),
                    (vh, (1, n.dv)),
                );
                // dS = s · P ⊙ (dP − Σⱼ dP ⊙ P), in place of dP
                let db = &dots[h * n.lq + r0..h * n.lq + r0 + m];
                for ((pr, dr), dot) in p.chunks(n.lk).zip(dp.chunks_mut(n.lk)).zip(db) {
                    for (x, pv) in dr.iter_mut().zip(pr) {
                        *x = scale * pv * (*x - dot);
                    }
                }
                // dQ = dS K
                matmul_serial(
                    (m, n.d, n.lk),
                    (&mut dqh[r0 * n.d..(r0 + m) * n.d], n.d, false),
                    (dp, (n.lk, 1)),
                    (kh, (n.d, 1)),
                );
                // dK += dSᵀ Q
                matmul_serial(
                    (n.lk, n.d, m),
                    (dkh, n.d, true),
                    (dp, (1, n.lk)),
                    (qb, (n.d, 1)),
                );
            }
        });
    (dq, dk, dvv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// The definition, in f64: output and, for a loss ⟨O, G⟩, the three gradients.
    #[allow(clippy::type_complexity)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &[f32],
        n: AttnDims,
        s: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut o = vec![0f64; n.bh * n.lq * n.dv];
        let (mut dq, mut dk, mut dv) = (
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; v.len()],
        );
        for h in 0..n.bh {
            for i in 0..n.lq {
                let sc: Vec<f64> = (0..n.lk)
                    .map(|j| {
                        (0..n.d)
                            .map(|c| {
                                q[(h * n.lq + i) * n.d + c] as f64
                                    * k[(h * n.lk + j) * n.d + c] as f64
                            })
                            .sum::<f64>()
                            * s
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                let gi = |c: usize| g[(h * n.lq + i) * n.dv + c] as f64;
                for c in 0..n.dv {
                    o[(h * n.lq + i) * n.dv + c] = (0..n.lk)
                        .map(|j| p[j] * v[(h * n.lk + j) * n.dv + c] as f64)
                        .sum();
                }
                let dp: Vec<f64> = (0..n.lk)
                    .map(|j| {
                        (0..n.dv)
                            .map(|c| gi(c) * v[(h * n.lk + j) * n.dv + c] as f64)
                            .sum()
                    })
                    .collect();
                let dot: f64 = (0..n.lk).map(|j| dp[j] * p[j]).sum();
                for j in 0..n.lk {
                    let ds = s * p[j] * (dp[j] - dot);
                    for c in 0..n.d {
                        dq[(h * n.lq + i) * n.d + c] += ds * k[(h * n.lk + j) * n.d + c] as f64;
                        dk[(h * n.lk + j) * n.d + c] += ds * q[(h * n.lq + i) * n.d + c] as f64;
                    }
                    for c in 0..n.dv {
                        dv[(h * n.lk + j) * n.dv + c] += p[j] * gi(c);
                    }
                }
            }
        }
        (o, dq, dk, dv)
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 2e-5 * (1.0 + scale),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn matches_the_definition() {
        for (seed, n) in [
            (
                1,
                AttnDims {
                    bh: 3,
                    lq: 50,
                    lk: 40,
                    d: 8,
                    dv: 8,
                },
            ),
            (
                2,
                AttnDims {
                    bh: 2,
                    lq: 7,
                    lk: 77,
                    d: 5,
                    dv: 6,
                },
            ),
            // more rows than one block holds (several blocks, a short last one)
            (
                3,
                AttnDims {
                    bh: 2,
                    lq: 1100,
                    lk: 130,
                    d: 4,
                    dv: 3,
                },
            ),
        ] {
            let q = rand(n.bh * n.lq * n.d, seed);
            let k = rand(n.bh * n.lk * n.d, seed + 10);
            let v = rand(n.bh * n.lk * n.dv, seed + 20);
            let g = rand(n.bh * n.lq * n.dv, seed + 30);
            let s = 0.37;
            let (o, dq, dk, dv) = reference(&q, &k, &v, &g, n, s as f64);
            let (out, lse) = forward(&q, &k, &v, n, s);
            close(&out, &o, "out");
            let (gq, gk, gv) = backward(&q, &k, &v, &out, &lse, &g, n, s);
            close(&gq, &dq, "dq");
            close(&gk, &dk, "dk");
            close(&gv, &dv, "dv");
        }
    }
}
