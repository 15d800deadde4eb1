// CUDA's built-ins on the host, so that the tests can run kernels.cu on the CPU exactly as
// written (driver.cpp). Each thread of a block is a host thread; the blocks of a launch run
// one after another, so a block's `__shared__` variables are statics. `__syncthreads()` is
// a barrier of the block, a warp shuffle a barrier of its warp around an exchange of
// values; a thread that returns leaves both barriers.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
using dim3 = uint3;

struct float2 {
  float x, y;
};
struct double2 {
  double x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

// The barriers and the shuffle slots of the running block.
struct Block {
  explicit Block(unsigned threads) : block(threads), slots(threads) {
    for (unsigned first = 0; first < threads; first += 32)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - first)));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;
};

inline Block *running = nullptr;

inline std::barrier<> &warp_barrier() { return *running->warps[threadIdx.x / 32]; }

}  // namespace emu

inline void __syncthreads() { emu::running->block.arrive_and_wait(); }

// The value of `v` in lane (this lane ^ `mask`) of the warp.
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const unsigned warp_base = threadIdx.x & ~31u, lane = threadIdx.x & 31u;
  std::memcpy(&emu::running->slots[threadIdx.x], &v, sizeof v);
  emu::warp_barrier().arrive_and_wait();
  T out;
  std::memcpy(&out, &emu::running->slots[warp_base + (lane ^ (unsigned)mask)], sizeof out);
  emu::warp_barrier().arrive_and_wait();
  return out;
}

namespace emu {

// A kernel called with its arguments as cuLaunchKernel takes them: a pointer to each.
using Kernel = std::function<void(void **)>;

inline std::map<std::string, Kernel> &kernels() {
  static std::map<std::string, Kernel> all;
  return all;
}

template <typename... A, std::size_t... I>
void call(void (*f)(A...), void **args, std::index_sequence<I...>) {
  f(*static_cast<A *>(args[I])...);
}

struct Registrar {
  template <typename... A>
  Registrar(const char *name, void (*f)(A...)) {
    kernels()[name] = [f](void **args) { call(f, args, std::index_sequence_for<A...>{}); };
  }
};

}  // namespace emu

#define NT_REGISTER(kernel) static emu::Registrar kernel##_registrar(#kernel, kernel);
