// The host's stand-in for CUDA's half-precision type, for the CPU build of kernels.cu
// (see host.h): IEEE binary16 with the compiler's _Float16, rounded to nearest even.
#pragma once

struct __half {
  _Float16 v;
};

inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return {(_Float16)f}; }
