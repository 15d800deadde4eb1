// Runs one launch of a kernel of kernels.cu on the CPU (host.h): reads the launch from
// standard input and writes its output buffers to standard output, little-endian.
//
//   in:  u32 name length, name, u32 blocks, u32 threads per block, u32 argument count,
//        then per argument a tag and its value: 0 input buffer (u64 bytes, the bytes),
//        1 i32, 2 i64, 3 f32, 4 output buffer (u64 bytes; it starts as all ones, NaN in
//        every float type, so that an element no thread writes shows)
//   out: the bytes of each output buffer, in order
#include "host.h"

#include "../kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <thread>

static void read(void *p, std::size_t n) {
  if (std::fread(p, 1, n, stdin) != n) {
    std::fprintf(stderr, "emulator: truncated launch\n");
    std::exit(2);
  }
}

template <typename T>
static T read() {
  T v;
  read(&v, sizeof v);
  return v;
}

int main() {
  std::string name(read<uint32_t>(), '\0');
  read(name.data(), name.size());
  const auto blocks = read<uint32_t>(), threads = read<uint32_t>();
  const auto count = read<uint32_t>();
  std::vector<std::vector<uint8_t>> buffers(count);
  std::vector<void *> pointers(count), args(count);
  std::vector<uint64_t> scalars(count);
  std::vector<uint32_t> outputs;
  for (uint32_t i = 0; i < count; i++) {
    const auto tag = read<uint8_t>();
    args[i] = &scalars[i];
    switch (tag) {
      case 0:
        buffers[i].resize(read<uint64_t>());
        read(buffers[i].data(), buffers[i].size());
        break;
      case 4:
        buffers[i].assign(read<uint64_t>(), 0xff);
        outputs.push_back(i);
        break;
      case 1: {
        const auto v = read<int32_t>();
        std::memcpy(&scalars[i], &v, sizeof v);
        break;
      }
      case 2: {
        const auto v = read<int64_t>();
        std::memcpy(&scalars[i], &v, sizeof v);
        break;
      }
      case 3: {
        const auto v = read<float>();
        std::memcpy(&scalars[i], &v, sizeof v);
        break;
      }
      default:
        std::fprintf(stderr, "emulator: argument tag %d\n", tag);
        return 2;
    }
    if (tag == 0 || tag == 4) {
      pointers[i] = buffers[i].data();
      args[i] = &pointers[i];
    }
  }
  const auto kernel = emu::kernels().find(name);
  if (kernel == emu::kernels().end()) {
    std::fprintf(stderr, "emulator: no kernel %s\n", name.c_str());
    return 2;
  }
  // The block's threads run every block in turn: between two blocks they wait for each
  // other, and the last to arrive moves on to the next block with fresh barriers.
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  blockIdx = {0, 0, 0};
  auto block = std::make_unique<emu::Block>(threads);
  emu::running = block.get();
  std::barrier next(threads, [&]() noexcept {
    blockIdx.x++;
    block = std::make_unique<emu::Block>(threads);
    emu::running = block.get();
  });
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; t++)
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0};
      for (unsigned b = 0; b < blocks; b++) {
        kernel->second(args.data());
        emu::warp_barrier().arrive_and_drop();
        emu::running->block.arrive_and_drop();
        next.arrive_and_wait();
      }
    });
  for (auto &th : pool) th.join();
  for (const auto i : outputs) std::fwrite(buffers[i].data(), 1, buffers[i].size(), stdout);
  return 0;
}
