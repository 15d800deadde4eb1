// nulltext's fused layer kernels for NVIDIA GPUs: group norm (+ SiLU) and its input
// gradient, layer norm's input gradient, GEGLU and its input gradient, and the
// element-wise steps of attention between its matrix products (each query's log-sum-exp,
// the probabilities from it, and the softmax's input gradient). Each is one launch
// where candle's tensor ops take one per element-wise step; the formulas are those of the
// CPU kernels (`src/cpu/kernels.rs`), computed in f32 with f64 sums for the statistics,
// for f32, f16 and bf16 tensors (`<name>_f32`, `_f16`, `_bf16`).
//
// A norm's block holds one group (group norm) or one row (layer norm) and reads it once
// per pass; a group of the UNet at 512² holds at most 40,960 values (the VAE's up to a
// million at full resolution), which stay in L2 between the passes.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float load(const float *p, long i) { return p[i]; }
__device__ __forceinline__ float load(const __half *p, long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16 *p, long i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float *p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half *p, long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16 *p, long i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// The sums of `a` and `b` over the block, in every thread (blockDim.x a multiple of 32).
__device__ double2 block_sum2(double a, double b) {
  __shared__ double2 partial[32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with `partial`
  if (lane == 0) partial[warp] = make_double2(a, b);
  __syncthreads();
  a = lane < warps ? partial[lane].x : 0.0;
  b = lane < warps ? partial[lane].y : 0.0;
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  return make_double2(a, b);
}

// Mean and 1/σ of the `n` values at `x` (two passes, f64 sums).
template <typename T>
__device__ float2 stats(const T *x, long n, float eps) {
  double s = 0.0;
  for (long i = threadIdx.x; i < n; i += blockDim.x) s += load(x, i);
  const double mean = block_sum2(s, 0.0).x / n;
  double q = 0.0;
  for (long i = threadIdx.x; i < n; i += blockDim.x) {
    const double d = load(x, i) - mean;
    q += d * d;
  }
  const double var = block_sum2(q, 0.0).x / n;
  return make_float2((float)mean, (float)(1.0 / sqrt(var + (double)eps)));
}

__device__ __forceinline__ float sigmoid(float u) { return 1.0f / (1.0f + expf(-u)); }

// One block per (image, group) of x [B, C, HW]: y = γ x̂ + β, then the SiLU when `silu`.
template <typename T>
__device__ void group_norm(const T *x, const T *gamma, const T *beta, T *y, int c, int hw,
                           int groups, float eps, int silu) {
  const int cg = c / groups, g = blockIdx.x % groups;
  const long n = (long)cg * hw, base = (long)blockIdx.x * n;
  x += base;
  y += base;
  const float2 st = stats(x, n, eps);
  for (long i = threadIdx.x; i < n; i += blockDim.x) {
    const int ch = g * cg + (int)(i / hw);
    const float a = st.y * load(gamma, ch);
    float v = load(x, i) * a + (load(beta, ch) - st.x * a);
    if (silu) v = v * sigmoid(v);
    store(y, i, v);
  }
}

// The input gradient of `n` normalized values at x (a group or a row) for the output
// gradient dy: dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂)), ĝ = γ·du, du = dy or, through the
// SiLU, dy·σ(u)(1 + u(1 − σ(u))) with u = γ x̂ + β. `channel(i)` indexes γ and β.
template <typename T, typename Channel>
__device__ void norm_backward(const T *x, const T *dy, const T *gamma, const T *beta, T *dx,
                              long n, float eps, int silu, Channel channel) {
  const float2 st = stats(x, n, eps);
  auto grad = [&](long i, float *xh) {
    const int ch = channel(i);
    const float ga = load(gamma, ch);
    *xh = (load(x, i) - st.x) * st.y;
    float du = load(dy, i);
    if (silu) {
      const float u = ga * *xh + load(beta, ch), s = sigmoid(u);
      du *= s * (1.0f + u * (1.0f - s));
    }
    return ga * du;
  };
  double s1 = 0.0, s2 = 0.0;
  for (long i = threadIdx.x; i < n; i += blockDim.x) {
    float xh;
    const float gh = grad(i, &xh);
    s1 += gh;
    s2 += gh * xh;
  }
  const double2 s = block_sum2(s1, s2);
  const float m1 = (float)(s.x / n), m2 = (float)(s.y / n);
  for (long i = threadIdx.x; i < n; i += blockDim.x) {
    float xh;
    const float gh = grad(i, &xh);
    store(dx, i, st.y * (gh - m1 - xh * m2));
  }
}

template <typename T>
__device__ void group_norm_backward(const T *x, const T *dy, const T *affine, T *dx, int c,
                                    int hw, int groups, float eps, int silu) {
  const int cg = c / groups, first = (blockIdx.x % groups) * cg;
  const long n = (long)cg * hw, base = (long)blockIdx.x * n;
  // affine = [γ | β]
  norm_backward(x + base, dy + base, affine, affine + c, dx + base, n, eps, silu,
                [=](long i) { return first + (int)(i / hw); });
}

// One block per row of width d.
template <typename T>
__device__ void layer_norm_backward(const T *x, const T *dy, const T *gamma, T *dx, int d,
                                    float eps) {
  const long base = (long)blockIdx.x * d;
  norm_backward(x + base, dy + base, gamma, gamma, dx + base, d, eps, 0,
                [](long i) { return (int)i; });
}

// GELU (erf form) and its slope Φ(b) + b φ(b).
__device__ __forceinline__ float2 gelu_and_slope(float b) {
  const float cdf = 0.5f * (1.0f + erff(b * 0.70710678118654752f));
  const float pdf = expf(-0.5f * b * b) * 0.39894228040143268f;
  return make_float2(b * cdf, cdf + b * pdf);
}

// Rows [a | b] of h (width 2·inner) to a · gelu(b) (width inner); one thread per output.
template <typename T>
__device__ void geglu(const T *h, T *y, long count, int inner) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < count;
       i += (long)gridDim.x * blockDim.x) {
    const long r = i / inner, j = i % inner, a = r * 2 * inner + j;
    store(y, i, load(h, a) * gelu_and_slope(load(h, a + inner)).x);
  }
}

// dh = [g · gelu(b) | g · a · gelu′(b)] for the output gradient g.
template <typename T>
__device__ void geglu_backward(const T *h, const T *g, T *dh, long count, int inner) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < count;
       i += (long)gridDim.x * blockDim.x) {
    const long r = i / inner, j = i % inner, a = r * 2 * inner + j;
    const float gv = load(g, i), av = load(h, a);
    const float2 gs = gelu_and_slope(load(h, a + inner));
    store(dh, a, gv * gs.x);
    store(dh, a + inner, gv * av * gs.y);
  }
}

// The largest of the `a` over the block, in every thread.
__device__ float block_max(float a) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) partial[warp] = a;
  __syncthreads();
  a = lane < warps ? partial[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  return a;
}

// One block per row of scores s (width n): lse = log Σⱼ exp(scale·sⱼ), in f32.
template <typename T>
__device__ void row_logsumexp(const T *s, float *lse, int n, float scale) {
  s += (long)blockIdx.x * n;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scale * load(s, j));
  m = block_max(m);
  double sum = 0.0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) sum += expf(scale * load(s, j) - m);
  sum = block_sum2(sum, 0.0).x;
  if (threadIdx.x == 0) lse[blockIdx.x] = m + (float)log(sum);
}

// p = exp(scale·s − lse of its row), rows of width n.
template <typename T>
__device__ void probs(const T *s, const float *lse, T *p, long count, int n, float scale) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < count;
       i += (long)gridDim.x * blockDim.x)
    store(p, i, expf(scale * load(s, i) - lse[i / n]));
}

// One warp per row (width d): dot = Σ aⱼ bⱼ, in f32.
template <typename T>
__device__ void row_dot(const T *a, const T *b, float *dot, long rows, int d) {
  const long row = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  a += row * d;
  b += row * d;
  float sum = 0.0f;
  for (int j = lane; j < d; j += 32) sum += load(a, j) * load(b, j);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) dot[row] = sum;
}

// The softmax's input gradient: ds = scale · p ⊙ (dp − dot of its row), rows of width n.
template <typename T>
__device__ void softmax_grad(const T *p, const T *dp, const float *dot, T *ds, long count, int n,
                             float scale) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < count;
       i += (long)gridDim.x * blockDim.x)
    store(ds, i, scale * load(p, i) * (load(dp, i) - dot[i / n]));
}

// The host build of these kernels for the tests (emulator/host.h) registers each by name.
#ifndef NT_REGISTER
#define NT_REGISTER(kernel)
#endif

#define FOR_TYPES(KERNEL) KERNEL(float, f32) KERNEL(__half, f16) KERNEL(__nv_bfloat16, bf16)

#define GROUP_NORM(T, S)                                                                   \
  extern "C" __global__ void nt_group_norm_##S(const T *x, const T *gamma, const T *beta,  \
                                               T *y, int c, int hw, int groups, float eps, \
                                               int silu) {                                 \
    group_norm(x, gamma, beta, y, c, hw, groups, eps, silu);                              \
  }                                                                                        \
  NT_REGISTER(nt_group_norm_##S)
#define GROUP_NORM_BACKWARD(T, S)                                                          \
  extern "C" __global__ void nt_group_norm_backward_##S(                                   \
      const T *x, const T *dy, const T *affine, T *dx, int c, int hw, int groups,          \
      float eps, int silu) {                                                               \
    group_norm_backward(x, dy, affine, dx, c, hw, groups, eps, silu);                      \
  }                                                                                        \
  NT_REGISTER(nt_group_norm_backward_##S)
#define LAYER_NORM_BACKWARD(T, S)                                                          \
  extern "C" __global__ void nt_layer_norm_backward_##S(const T *x, const T *dy,           \
                                                        const T *gamma, T *dx, int d,      \
                                                        float eps) {                       \
    layer_norm_backward(x, dy, gamma, dx, d, eps);                                         \
  }                                                                                        \
  NT_REGISTER(nt_layer_norm_backward_##S)
#define GEGLU(T, S)                                                                        \
  extern "C" __global__ void nt_geglu_##S(const T *h, T *y, long count, int inner) {       \
    geglu(h, y, count, inner);                                                             \
  }                                                                                        \
  NT_REGISTER(nt_geglu_##S)                                                                \
  extern "C" __global__ void nt_geglu_backward_##S(const T *h, const T *g, T *dh,          \
                                                   long count, int inner) {                \
    geglu_backward(h, g, dh, count, inner);                                                \
  }                                                                                        \
  NT_REGISTER(nt_geglu_backward_##S)

#define ATTENTION(T, S)                                                                    \
  extern "C" __global__ void nt_row_logsumexp_##S(const T *s, float *lse, int n,           \
                                                  float scale) {                           \
    row_logsumexp(s, lse, n, scale);                                                       \
  }                                                                                        \
  NT_REGISTER(nt_row_logsumexp_##S)                                                        \
  extern "C" __global__ void nt_probs_##S(const T *s, const float *lse, T *p, long count,  \
                                          int n, float scale) {                            \
    probs(s, lse, p, count, n, scale);                                                     \
  }                                                                                        \
  NT_REGISTER(nt_probs_##S)                                                                \
  extern "C" __global__ void nt_row_dot_##S(const T *a, const T *b, float *dot, long rows, \
                                            int d) {                                       \
    row_dot(a, b, dot, rows, d);                                                           \
  }                                                                                        \
  NT_REGISTER(nt_row_dot_##S)                                                              \
  extern "C" __global__ void nt_softmax_grad_##S(const T *p, const T *dp, const float *dot, \
                                                 T *ds, long count, int n, float scale) {  \
    softmax_grad(p, dp, dot, ds, count, n, scale);                                         \
  }                                                                                        \
  NT_REGISTER(nt_softmax_grad_##S)

FOR_TYPES(GROUP_NORM)
FOR_TYPES(GROUP_NORM_BACKWARD)
FOR_TYPES(LAYER_NORM_BACKWARD)
FOR_TYPES(GEGLU)
FOR_TYPES(ATTENTION)
