//! CPU kernels for the two hottest element-wise stages of Stable Diffusion, which candle
//! runs as chains of scalar tensor ops: the attention softmax (one scalar `expf` per score
//! element) and group normalization (eight passes). Both are written so that the compiler
//! vectorizes them, and compiled twice: for the baseline target and for AVX2+FMA, chosen at
//! run time.

use rayon::prelude::*;

/// ln 2 split in two for the range reduction of the exponentials below.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// The remainder polynomial of the exponentials below, highest degree first (Cephes).
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5e-1,
];

/// eˣ for f32 within 2 ulp over the range softmax needs, branch-free so that loops over it
/// vectorize: exponent by rounding x·log₂e, remainder by a degree-6 polynomial (Cephes).
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let [c0, c1, c2, c3, c4, c5] = EXP_POLY;
    let mut p = c0;
    p = p * r + c1;
    p = p * r + c2;
    p = p * r + c3;
    p = p * r + c4;
    p = p * r + c5;
    p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const LANES: usize = 16;

#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    // independent lanes so that it vectorizes
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        max = max.max(v);
    }
    if max.is_finite() {
        max
    } else {
        0.0
    }
}

/// `row ← e^(scale·row − shift)`; returns the sum.
#[inline(always)]
fn exp_shifted_body(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut s = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp_approx(c[i] * scale - shift);
            c[i] = e;
            s[i] += e;
        }
    }
    let mut sum: f32 = s.iter().sum();
    for v in chunks.into_remainder() {
        let e = exp_approx(*v * scale - shift);
        *v = e;
        sum += e;
    }
    sum
}

#[inline(always)]
fn softmax_row_body(row: &mut [f32], scale: f32) -> f32 {
    let shift = row_max(row) * scale;
    let sum = exp_shifted_body(row, scale, shift);
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    shift + sum.ln()
}

/// The AVX2+FMA softmax row: the same arithmetic as [`exp_approx`], 8 lanes at a time.
/// Returns the log-sum-exp of `scale · row`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let full = n / 8 * 8;
    // 1. max
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for j in full..n {
        max = max.max(*p.add(j));
    }
    if !max.is_finite() {
        max = 0.0;
    }
    // 2. e^(scale·x − scale·max), and its sum
    let shift = max * scale;
    let sum = exp_shifted_avx2(row, scale, shift);
    // 3. normalize
    let vinv = _mm256_set1_ps(1.0 / sum);
    let mut i = 0;
    while i < full {
        _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
        i += 8;
    }
    let inv = 1.0 / sum;
    for j in full..n {
        *p.add(j) *= inv;
    }
    shift + sum.ln()
}

/// `row ← e^(scale·row − shift)` with AVX2+FMA; returns the sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let full = n / 8 * 8;
    let mut lanes = [0f32; 8];
    let vscale = _mm256_set1_ps(scale);
    let vshift = _mm256_set1_ps(shift);
    let lo = _mm256_set1_ps(-87.0);
    let hi = _mm256_set1_ps(88.0);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let ln2_hi = _mm256_set1_ps(LN2_HI);
    let ln2_lo = _mm256_set1_ps(LN2_LO);
    let c = EXP_POLY.map(|v| _mm256_set1_ps(v));
    let one = _mm256_set1_ps(1.0);
    let bias = _mm256_set1_epi32(127);
    let mut vsum = _mm256_setzero_ps();
    let mut i = 0;
    while i < full {
        let x = _mm256_fmsub_ps(_mm256_loadu_ps(p.add(i)), vscale, vshift);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, log2e),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, x));
        let mut q = c[0];
        q = _mm256_fmadd_ps(q, r, c[1]);
        q = _mm256_fmadd_ps(q, r, c[2]);
        q = _mm256_fmadd_ps(q, r, c[3]);
        q = _mm256_fmadd_ps(q, r, c[4]);
        q = _mm256_fmadd_ps(q, r, c[5]);
        q = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(q, r), r, r), one);
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), bias),
            23,
        ));
        let e = _mm256_mul_ps(q, pow2);
        _mm256_storeu_ps(p.add(i), e);
        vsum = _mm256_add_ps(vsum, e);
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), vsum);
    let mut sum: f32 = lanes.iter().sum();
    for j in full..n {
        let e = exp_approx(*p.add(j) * scale - shift);
        *p.add(j) = e;
        sum += e;
    }
    sum
}

/// `row ← e^(scale·row − shift)` with AVX-512F, 16 lanes: the arithmetic of
/// [`exp_shifted_avx2`]; returns the sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let full = n / 16 * 16;
    let vscale = _mm512_set1_ps(scale);
    let vshift = _mm512_set1_ps(shift);
    let lo = _mm512_set1_ps(-87.0);
    let hi = _mm512_set1_ps(88.0);
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let ln2_hi = _mm512_set1_ps(LN2_HI);
    let ln2_lo = _mm512_set1_ps(LN2_LO);
    let c = EXP_POLY.map(|v| _mm512_set1_ps(v));
    let one = _mm512_set1_ps(1.0);
    let bias = _mm512_set1_epi32(127);
    // two accumulators: the additions do not wait on each other
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < full {
        let x = _mm512_fmsub_ps(_mm512_loadu_ps(p.add(i)), vscale, vshift);
        let x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, log2e),
        );
        let r = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x));
        let mut q = c[0];
        q = _mm512_fmadd_ps(q, r, c[1]);
        q = _mm512_fmadd_ps(q, r, c[2]);
        q = _mm512_fmadd_ps(q, r, c[3]);
        q = _mm512_fmadd_ps(q, r, c[4]);
        q = _mm512_fmadd_ps(q, r, c[5]);
        q = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(q, r), r, r), one);
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            bias,
        )));
        let e = _mm512_mul_ps(q, pow2);
        _mm512_storeu_ps(p.add(i), e);
        if i & 16 == 0 {
            s0 = _mm512_add_ps(s0, e);
        } else {
            s1 = _mm512_add_ps(s1, e);
        }
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for j in full..n {
        let e = exp_approx(*p.add(j) * scale - shift);
        *p.add(j) = e;
        sum += e;
    }
    sum
}

/// The largest element of `row` with AVX-512F (0 when it is not finite).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_ptr();
    let full = n / 16 * 16;
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
        i += 16;
    }
    let mut max = _mm512_reduce_max_ps(vmax);
    for j in full..n {
        max = max.max(*p.add(j));
    }
    if max.is_finite() {
        max
    } else {
        0.0
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// In place: softmax(scale · row), on the calling thread. Returns the log-sum-exp of
/// `scale · row`, from which [`exp_shifted_row`] recomputes the same probabilities.
pub fn softmax_row(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { softmax_row_avx2(row, scale) };
    }
    softmax_row_body(row, scale)
}

/// In place: `row ← e^(scale·row − scale·max(row))`, on the calling thread: the softmax
/// before its normalization. Returns the sum (what the row is to be divided by) and the
/// log-sum-exp of `scale · row`.
pub fn exp_row(row: &mut [f32], scale: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512F (checked).
        let shift = unsafe { row_max_avx512(row) } * scale;
        let sum = unsafe { exp_shifted_avx512(row, scale, shift) };
        return (sum, shift + sum.ln());
    }
    let shift = row_max(row) * scale;
    let sum = exp_shifted_row(row, scale, shift);
    (sum, shift + sum.ln())
}

/// In place: `row ← e^(scale·row − shift)`, on the calling thread; returns the sum.
pub fn exp_shifted_row(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports AVX-512F (checked).
        return unsafe { exp_shifted_avx512(row, scale, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { exp_shifted_avx2(row, scale, shift) };
    }
    exp_shifted_body(row, scale, shift)
}

/// In place, for every row of `data` (rows of length `n`): softmax(scale · row).
pub fn softmax_rows(data: &mut [f32], n: usize, scale: f32) {
    let avx2 = has_avx2();
    let rows_per_task = (1 << 15) / n.max(1) + 1;
    data.par_chunks_mut(n * rows_per_task).for_each(|block| {
        for row in block.chunks_mut(n) {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                unsafe { softmax_row_avx2(row, scale) };
                continue;
            }
            let _ = avx2;
            softmax_row_body(row, scale);
        }
    });
}

/// `x σ(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_approx(-x))
}

/// Mean and `1/σ` of a group, in f64 lanes for accuracy over large groups.
#[inline(always)]
fn group_stats(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len();
    // mean and variance in f64 lanes for accuracy over large groups
    let mut s = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            s[i] += c[i] as f64;
        }
    }
    let mut sum: f64 = s.iter().sum();
    sum += chunks.remainder().iter().map(|v| *v as f64).sum::<f64>();
    let mean = sum / n as f64;
    let mut q = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            let d = c[i] as f64 - mean;
            q[i] += d * d;
        }
    }
    let mut sq: f64 = q.iter().sum();
    sq += chunks
        .remainder()
        .iter()
        .map(|v| (*v as f64 - mean) * (*v as f64 - mean))
        .sum::<f64>();
    (mean, 1.0 / (sq / n as f64 + eps).sqrt())
}

#[inline(always)]
fn group_norm_body(
    x: &[f32],
    out: &mut [f32],
    hw: usize,
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
    with_silu: bool,
) {
    let (mean, rstd) = group_stats(x, eps);
    for (ch, (xs, os)) in x.chunks(hw).zip(out.chunks_mut(hw)).enumerate() {
        let a = (rstd as f32) * gamma[ch];
        let b = beta[ch] - (mean as f32) * a;
        if with_silu {
            for (o, v) in os.iter_mut().zip(xs) {
                *o = silu(v * a + b);
            }
        } else {
            for (o, v) in os.iter_mut().zip(xs) {
                *o = v * a + b;
            }
        }
    }
}

/// The input gradient of one group of [`group_norm`] (and of the SiLU after it):
/// `dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂))` with `ĝ = γ·du`, `du = dy` or, through the
/// SiLU, `dy·σ(u)(1 + u(1 − σ(u)))` with `u = γ x̂ + β`.
#[inline(always)]
fn group_norm_backward_body(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    hw: usize,
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
    with_silu: bool,
) {
    let (mean, rstd) = group_stats(x, eps);
    let (m, r) = (mean as f32, rstd as f32);
    // pass 1: ĝ (kept in dx) and the two sums
    let (mut s1, mut s2) = (0f64, 0f64);
    for (ch, ((xs, gs), ds)) in x
        .chunks(hw)
        .zip(dy.chunks(hw))
        .zip(dx.chunks_mut(hw))
        .enumerate()
    {
        let (ga, be) = (gamma[ch], beta[ch]);
        let grad = |xv: f32, gv: f32| -> (f32, f32) {
            let xh = (xv - m) * r;
            let du = if with_silu {
                let u = ga * xh + be;
                let sg = 1.0 / (1.0 + exp_approx(-u));
                gv * sg * (1.0 + u * (1.0 - sg))
            } else {
                gv
            };
            (ga * du, xh)
        };
        // independent lanes so that it vectorizes
        let (mut a1, mut a2) = ([0f32; LANES], [0f32; LANES]);
        let mut xc = xs.chunks_exact(LANES);
        let mut gc = gs.chunks_exact(LANES);
        let mut dc = ds.chunks_exact_mut(LANES);
        for ((xv, gv), d) in (&mut xc).zip(&mut gc).zip(&mut dc) {
            for i in 0..LANES {
                let (gh, xh) = grad(xv[i], gv[i]);
                d[i] = gh;
                a1[i] += gh;
                a2[i] += gh * xh;
            }
        }
        for ((xv, gv), d) in xc
            .remainder()
            .iter()
            .zip(gc.remainder())
            .zip(dc.into_remainder())
        {
            let (gh, xh) = grad(*xv, *gv);
            *d = gh;
            a1[0] += gh;
            a2[0] += gh * xh;
        }
        s1 += a1.iter().map(|v| *v as f64).sum::<f64>();
        s2 += a2.iter().map(|v| *v as f64).sum::<f64>();
    }
    let n = x.len() as f64;
    let (m1, m2) = ((s1 / n) as f32, (s2 / n) as f32);
    // pass 2: dx
    for (xv, d) in x.iter().zip(dx.iter_mut()) {
        let xh = (xv - m) * r;
        *d = r * (*d - m1 - xh * m2);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_norm_backward_avx2(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    hw: usize,
    affine: (&[f32], &[f32]),
    eps: f64,
    with_silu: bool,
) {
    group_norm_backward_body(x, dy, dx, hw, affine, eps, with_silu)
}

/// The input gradient of [`group_norm`] (with `with_silu`, of the SiLU after it too) for
/// the output gradient `dy`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    dy: &[f32],
    c: usize,
    hw: usize,
    groups: usize,
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
    with_silu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), dy.len());
    let mut dx = vec![0f32; x.len()];
    let cg = c / groups;
    let avx2 = has_avx2();
    dx.par_chunks_mut(cg * hw)
        .zip(x.par_chunks(cg * hw).zip(dy.par_chunks(cg * hw)))
        .enumerate()
        .for_each(|(k, (d, (xs, gs)))| {
            let g = k % groups;
            let aff = (&gamma[g * cg..(g + 1) * cg], &beta[g * cg..(g + 1) * cg]);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                unsafe { group_norm_backward_avx2(xs, gs, d, hw, aff, eps, with_silu) };
                return;
            }
            let _ = avx2;
            group_norm_backward_body(xs, gs, d, hw, aff, eps, with_silu);
        });
    dx
}

/// The gradients of group norm's `gamma` and `beta` (`[C]` each) given the input `x`
/// `[B, C, HW]` and the output gradient `dy`: `Σ dû·x̂` and `Σ dû` over images and positions,
/// with `dû` the gradient before the SiLU when `with_silu`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_affine_grads(
    x: &[f32],
    dy: &[f32],
    c: usize,
    hw: usize,
    groups: usize,
    (gamma, beta): (&[f32], &[f32]),
    eps: f64,
    with_silu: bool,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), dy.len());
    let cg = c / groups;
    // per (image, group): the sums of its channels
    let parts: Vec<(usize, Vec<f64>, Vec<f64>)> = x
        .par_chunks(cg * hw)
        .zip(dy.par_chunks(cg * hw))
        .enumerate()
        .map(|(k, (xs, gs))| {
            let g = k % groups;
            let (mean, rstd) = group_stats(xs, eps);
            let (m, r) = (mean as f32, rstd as f32);
            let mut dg = vec![0f64; cg];
            let mut db = vec![0f64; cg];
            for (j, (xc, gc)) in xs.chunks(hw).zip(gs.chunks(hw)).enumerate() {
                let (ga, be) = (gamma[g * cg + j], beta[g * cg + j]);
                let (mut a, mut b) = (0f64, 0f64);
                for (xv, gv) in xc.iter().zip(gc) {
                    let xh = (xv - m) * r;
                    let du = if with_silu {
                        let u = ga * xh + be;
                        let sg = 1.0 / (1.0 + (-u).exp());
                        gv * sg * (1.0 + u * (1.0 - sg))
                    } else {
                        *gv
                    };
                    a += (du * xh) as f64;
                    b += du as f64;
                }
                dg[j] = a;
                db[j] = b;
            }
            (g, dg, db)
        })
        .collect();
    let mut dgamma = vec![0f64; c];
    let mut dbeta = vec![0f64; c];
    for (g, dg, db) in parts {
        for j in 0..cg {
            dgamma[g * cg + j] += dg[j];
            dbeta[g * cg + j] += db[j];
        }
    }
    (
        dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta.into_iter().map(|v| v as f32).collect(),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_norm_avx2(
    x: &[f32],
    out: &mut [f32],
    hw: usize,
    affine: (&[f32], &[f32]),
    eps: f64,
    with_silu: bool,
) {
    group_norm_body(x, out, hw, affine, eps, with_silu)
}

/// Group normalization of `x` `[B, C, HW]` (contiguous, any B) with per-channel `gamma`,
/// `beta`; with `with_silu`, followed by the SiLU in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    c: usize,
    hw: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    with_silu: bool,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let cg = c / groups;
    let avx2 = has_avx2();
    out.par_chunks_mut(cg * hw)
        .zip(x.par_chunks(cg * hw))
        .enumerate()
        .for_each(|(k, (o, xs))| {
            let g = k % groups;
            let (ga, be) = (&gamma[g * cg..(g + 1) * cg], &beta[g * cg..(g + 1) * cg]);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                unsafe { group_norm_avx2(xs, o, hw, (ga, be), eps, with_silu) };
                return;
            }
            let _ = avx2;
            group_norm_body(xs, o, hw, (ga, be), eps, with_silu);
        });
    out
}

/// Layer normalization of the rows (length `d`) of `x`, with `gamma`, `beta`.
pub fn layer_norm(x: &[f32], d: usize, gamma: &[f32], beta: &[f32], eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d.max(1))
        .zip(x.par_chunks(d.max(1)))
        .for_each(|(o, r)| {
            let (mean, rstd) = group_stats(r, eps);
            let (m, rs) = (mean as f32, rstd as f32);
            for (((o, v), g), b) in o.iter_mut().zip(r).zip(gamma).zip(beta) {
                *o = (v - m) * rs * g + b;
            }
        });
    out
}

/// The input gradient of [`layer_norm`] for the output gradient `dy`:
/// `dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂))` per row, with `ĝ = γ·dy`.
pub fn layer_norm_backward(x: &[f32], dy: &[f32], d: usize, gamma: &[f32], eps: f64) -> Vec<f32> {
    assert_eq!(x.len(), dy.len());
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d.max(1))
        .zip(x.par_chunks(d.max(1)).zip(dy.par_chunks(d.max(1))))
        .for_each(|(o, (r, g))| {
            let (mean, rstd) = group_stats(r, eps);
            let (m, rs) = (mean as f32, rstd as f32);
            let (mut s1, mut s2) = (0f64, 0f64);
            for ((v, gv), ga) in r.iter().zip(g).zip(gamma) {
                let gh = (gv * ga) as f64;
                s1 += gh;
                s2 += gh * ((v - m) * rs) as f64;
            }
            let n = d as f64;
            let (m1, m2) = ((s1 / n) as f32, (s2 / n) as f32);
            for (((o, v), gv), ga) in o.iter_mut().zip(r).zip(g).zip(gamma) {
                let xh = (v - m) * rs;
                *o = rs * (gv * ga - m1 - xh * m2);
            }
        });
    dx
}

/// GELU (erf form) and its derivative at `x`.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    // φ(x) = e^(−x²/2)/√(2π)
    let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
    (x * cdf, cdf + x * pdf)
}

/// GEGLU: for rows `[a | b]` of width `2·inner`, `a · gelu(b)` (rows of width `inner`).
pub fn geglu(h: &[f32], inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; h.len() / 2];
    out.par_chunks_mut(inner.max(1))
        .zip(h.par_chunks(2 * inner.max(1)))
        .for_each(|(o, r)| {
            let (a, b) = r.split_at(inner);
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a
                    * (b * 0.5
                        * (1.0
                            + candle_core::cpu::erf::erf_f32(b * std::f32::consts::FRAC_1_SQRT_2)));
            }
        });
    out
}

/// The gradient of [`geglu`]'s input `h` for the output gradient `g`:
/// `[g · gelu(b) | g · a · gelu′(b)]`.
pub fn geglu_backward(h: &[f32], g: &[f32], inner: usize) -> Vec<f32> {
    assert_eq!(h.len(), 2 * g.len());
    let mut dh = vec![0f32; h.len()];
    dh.par_chunks_mut(2 * inner.max(1))
        .zip(
            h.par_chunks(2 * inner.max(1))
                .zip(g.par_chunks(inner.max(1))),
        )
        .for_each(|(d, (r, g))| {
            let (a, b) = r.split_at(inner);
            let (da, db) = d.split_at_mut(inner);
            for i in 0..inner {
                let (gelu, slope) = gelu_and_slope(b[i]);
                da[i] = g[i] * gelu;
                db[i] = g[i] * a[i] * slope;
            }
        });
    dh
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = exp_approx(x) as f64;
            let e = (x as f64).exp();
            worst = worst.max(((a - e) / e).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "{worst}");
    }

    #[test]
    fn softmax_matches_the_definition() {
        for n in [37, 64, 77, 1024] {
            check_softmax(n);
        }
    }

    /// The log-sum-exp a softmax row returns recomputes the same probabilities.
    #[test]
    fn log_sum_exp_recomputes_the_probabilities() {
        for n in [5, 40, 77, 1000] {
            let orig: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 / 3.0 - 2.5).collect();
            let mut p = orig.clone();
            let lse = softmax_row(&mut p, 0.8);
            let m = orig.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64 * 0.8;
            let want = m + orig
                .iter()
                .map(|v| (*v as f64 * 0.8 - m).exp())
                .sum::<f64>()
                .ln();
            assert!((lse as f64 - want).abs() < 1e-5, "{lse} vs {want}");
            let mut q = orig.clone();
            exp_shifted_row(&mut q, 0.8, lse);
            for (a, b) in p.iter().zip(&q) {
                assert!((a - b).abs() < 1e-6 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }

    /// ⟨dy, f(x + εv) − f(x − εv)⟩ / 2ε  against  ⟨backward(dy), v⟩.
    fn check_directional(
        f: impl Fn(&[f32]) -> Vec<f32>,
        backward: impl Fn(&[f32], &[f32]) -> Vec<f32>,
        x: &[f32],
        dy: &[f32],
    ) {
        let v: Vec<f32> = (0..x.len())
            .map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.45)
            .collect();
        let eps = 1e-2f32;
        let shifted = |sign: f32| -> Vec<f64> {
            let xs: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a + sign * eps * b).collect();
            // f64 accumulation of f's output against dy
            f(&xs).iter().map(|y| *y as f64).collect()
        };
        let (p, m) = (shifted(1.0), shifted(-1.0));
        let fd: f64 = p
            .iter()
            .zip(&m)
            .zip(dy)
            .map(|((a, b), g)| (a - b) * *g as f64)
            .sum::<f64>()
            / (2.0 * eps as f64);
        let dx = backward(x, dy);
        let an: f64 = dx.iter().zip(&v).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (fd - an).abs() < 2e-3 * (1.0 + an.abs()),
            "finite difference {fd} vs {an}"
        );
    }

    #[test]
    fn group_norm_backward_matches_finite_differences() {
        let (c, hw, groups) = (6, 10, 3);
        let x: Vec<f32> = (0..2 * c * hw)
            .map(|i| ((i * 7919) % 97) as f32 / 20.0 - 2.0)
            .collect();
        let dy: Vec<f32> = (0..x.len())
            .map(|i| ((i * 13) % 23) as f32 / 10.0 - 1.1)
            .collect();
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.3).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 * 0.2 - 0.4).collect();
        for silu in [false, true] {
            check_directional(
                |x| group_norm(x, c, hw, groups, &gamma, &beta, 1e-5, silu),
                |x, dy| group_norm_backward(x, dy, c, hw, groups, (&gamma, &beta), 1e-5, silu),
                &x,
                &dy,
            );
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let d = 12;
        let x: Vec<f32> = (0..5 * d)
            .map(|i| ((i * 7919) % 89) as f32 / 17.0 - 2.0)
            .collect();
        let dy: Vec<f32> = (0..x.len())
            .map(|i| ((i * 13) % 23) as f32 / 10.0 - 1.1)
            .collect();
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..d).map(|i| i as f32 * 0.05 - 0.3).collect();
        check_directional(
            |x| layer_norm(x, d, &gamma, &beta, 1e-5),
            |x, dy| layer_norm_backward(x, dy, d, &gamma, 1e-5),
            &x,
            &dy,
        );
    }

    #[test]
    fn geglu_backward_matches_finite_differences() {
        let inner = 7;
        let h: Vec<f32> = (0..3 * 2 * inner)
            .map(|i| ((i * 31) % 29) as f32 / 7.0 - 2.0)
            .collect();
        let g: Vec<f32> = (0..3 * inner)
            .map(|i| ((i * 17) % 13) as f32 / 6.0 - 1.0)
            .collect();
        check_directional(
            |h| geglu(h, inner),
            |h, g| geglu_backward(h, g, inner),
            &h,
            &g,
        );
        // and the value: a · gelu(b)
        let y = geglu(&h, inner);
        let (a, b) = (h[0] as f64, h[inner] as f64);
        let erf_b = candle_core::cpu::erf::erf_f64(b / std::f64::consts::SQRT_2);
        assert!((y[0] as f64 - a * 0.5 * b * (1.0 + erf_b)).abs() < 1e-5);
    }

    fn check_softmax(n: usize) {
        let mut data: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 7919) % 101) as f32 / 13.0 - 3.0)
            .collect();
        let orig = data.clone();
        softmax_rows(&mut data, n, 0.7);
        for r in 0..3 {
            let row = &orig[r * n..(r + 1) * n];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64 * 0.7;
            let z: f64 = row.iter().map(|v| (*v as f64 * 0.7 - m).exp()).sum();
            for j in 0..n {
                let want = (row[j] as f64 * 0.7 - m).exp() / z;
                assert!((data[r * n + j] as f64 - want).abs() < 1e-6);
            }
        }
    }
}
