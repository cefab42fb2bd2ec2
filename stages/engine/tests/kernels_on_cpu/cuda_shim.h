// Runs CUDA kernels as host C++: enough of CUDA's execution model for `src/gpu/kernels.cu`.
// A launch runs its blocks one after another. `launch` gives every thread of a block its own OS
// thread, so `__syncthreads` (a barrier over the block) and `__shfl_down_sync` (an exchange
// through a per-warp slot array between two barriers over the warp) behave as on a GPU;
// `launch_serial` runs the threads one by one, for kernels that never synchronise. `__shared__`
// becomes `static`: one copy, which is right while one block runs at a time.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

namespace shim {
inline std::barrier<>* block_barrier = nullptr;
struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    float slots[32];
};
inline std::vector<Warp>* warps = nullptr;
inline unsigned linear_thread() {
    return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
}
}  // namespace shim

inline void __syncthreads() { shim::block_barrier->arrive_and_wait(); }

inline float __shfl_down_sync(unsigned, float v, int offset) {
    const unsigned t = shim::linear_thread(), lane = t % 32;
    shim::Warp& w = (*shim::warps)[t / 32];
    w.slots[lane] = v;
    w.bar->arrive_and_wait();
    const float r = lane + offset < 32 ? w.slots[lane + offset] : v;
    w.bar->arrive_and_wait();
    return r;
}

// Runs `kernel()` as a grid of `grid` blocks of `block` threads, a thread each.
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(threads);
                std::vector<shim::Warp> warps((threads + 31) / 32);
                for (unsigned w = 0; w < warps.size(); ++w)
                    warps[w].bar = std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w));
                shim::block_barrier = &bar;
                shim::warps = &warps;
                std::vector<std::thread> ts;
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx)
                            ts.emplace_back([&, tx, ty, tz] {
                                threadIdx = {tx, ty, tz};
                                blockIdx = {bx, by, bz};
                                kernel();
                            });
                for (auto& t : ts) t.join();
            }
}

// Runs `kernel()` for every thread of the grid in turn: only for kernels without barriers or
// shuffles.
template <class F>
void launch_serial(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx)
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx) {
                            threadIdx = {tx, ty, tz};
                            blockIdx = {bx, by, bz};
                            kernel();
                        }
}
