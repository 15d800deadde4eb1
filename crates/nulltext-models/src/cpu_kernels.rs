//! CPU kernels for the two hottest element-wise stages of Stable Diffusion, which candle
//! runs as chains of scalar tensor ops: the attention softmax (one scalar `expf` per score
//! element) and group normalization (eight passes). Both are written so that the compiler
//! vectorizes them, and compiled twice: for the baseline target and for AVX2+FMA, chosen at
//! run time.

use rayon::prelude::*;

/// eˣ for f32 within 2 ulp over the range softmax needs, branch-free so that loops over it
/// vectorize: exponent by rounding x·log₂e, remainder by a degree-6 polynomial (Cephes).
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const LANES: usize = 16;

#[inline(always)]
fn softmax_row_body(row: &mut [f32], scale: f32) {
    // max, with independent lanes so it vectorizes
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
    if !max.is_finite() {
        max = 0.0;
    }
    let shift = max * scale;
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
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The AVX2+FMA softmax row: the same arithmetic as [`exp_approx`], 8 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], scale: f32) {
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
    let vscale = _mm256_set1_ps(scale);
    let vshift = _mm256_set1_ps(max * scale);
    let lo = _mm256_set1_ps(-87.0);
    let hi = _mm256_set1_ps(88.0);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let ln2_hi = _mm256_set1_ps(0.693_359_4);
    let ln2_lo = _mm256_set1_ps(-2.121_944_4e-4);
    let c = [
        _mm256_set1_ps(1.987_569_1e-4),
        _mm256_set1_ps(1.398_199_9e-3),
        _mm256_set1_ps(8.333_452e-3),
        _mm256_set1_ps(4.166_579_6e-2),
        _mm256_set1_ps(1.666_666_5e-1),
        _mm256_set1_ps(5e-1),
    ];
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
    let shift = max * scale;
    for j in full..n {
        let e = exp_approx(*p.add(j) * scale - shift);
        *p.add(j) = e;
        sum += e;
    }
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

/// In place: softmax(scale · row), on the calling thread.
pub fn softmax_row(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        unsafe { softmax_row_avx2(row, scale) };
        return;
    }
    softmax_row_body(row, scale);
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

#[inline(always)]
fn group_norm_body(x: &[f32], out: &mut [f32], hw: usize, gamma: &[f32], beta: &[f32], eps: f64) {
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
    let rstd = 1.0 / (sq / n as f64 + eps).sqrt();
    for (ch, (xs, os)) in x.chunks(hw).zip(out.chunks_mut(hw)).enumerate() {
        let a = (rstd as f32) * gamma[ch];
        let b = beta[ch] - (mean as f32) * a;
        for (o, v) in os.iter_mut().zip(xs) {
            *o = v * a + b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_norm_avx2(
    x: &[f32],
    out: &mut [f32],
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) {
    group_norm_body(x, out, hw, gamma, beta, eps)
}

/// Group normalization of `x` `[B, C, HW]` (contiguous, any B) with per-channel `gamma`, `beta`.
pub fn group_norm(
    x: &[f32],
    c: usize,
    hw: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
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
                unsafe { group_norm_avx2(xs, o, hw, ga, be, eps) };
                return;
            }
            let _ = avx2;
            group_norm_body(xs, o, hw, ga, be, eps);
        });
    out
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
