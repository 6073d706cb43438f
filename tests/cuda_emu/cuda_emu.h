// A CPU stand-in for the parts of CUDA that lmkit's kernels use, so that their source — the .cu
// files the GPU runs — compiles with a C++20 compiler and can be checked where there is no GPU
// (tests/parity/test_cuda_kernels.py).
//
// Each block's threads run as OS threads, one block at a time, so a `__shared__` array (static
// here) belongs to the running block. __syncthreads and __syncwarp are barriers; a thread that
// returns leaves both. Warp shuffles exchange through per-thread slots between two warp
// barriers. Dynamic shared memory is filled with NaNs before each block, so a kernel that reads
// what it never wrote shows it. WMMA fragments hold the whole tile in every lane (elementwise
// operations over `x[0..num_elements)` act on every element, as they do spread over the lanes
// on the GPU); a store writes through lane 0 between two warp barriers; loads and stores check
// the pointer alignment and leading dimension the hardware requires; TF32 products drop each
// input's low 13 mantissa bits as the tensor cores do. `mma_bf16` (attention_bf16.cu's
// mma.sync m16n8k16) is warp-collective as on the GPU: every lane posts its fragment registers,
// the [16, 16]·[16, 8] product is assembled from all 32 lanes by the PTX ISA's fragment layouts,
// and each lane takes back its own four results — so a kernel that gets the layouts wrong fails
// here as it would there.
#pragma once

#include <math.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

struct Block {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
  std::vector<std::array<uint32_t, 10>> mma;  // one mma.sync operand slot per thread
  explicit Block(unsigned n) : all(n), slots(n), mma(n) {
    for (unsigned w = 0; w * 32 < n; w++)
      warps.emplace_back(new std::barrier<>(std::min(32u, n - w * 32)));
  }
};

inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline thread_local Block* block = nullptr;
inline unsigned char* dynamic_shared = nullptr;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

inline unsigned linear_thread() {
  return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}

inline std::barrier<>& warp_barrier() { return *block->warps[linear_thread() / 32]; }

// Runs `kernel()` as a grid of `grid` blocks of `threads` threads with `shared_bytes` of dynamic
// shared memory.
template <class F>
void launch(dim3 grid, dim3 threads, size_t shared_bytes, F kernel) {
  unsigned n = threads.x * threads.y * threads.z;
  if (n == 0 || n > 1024) fail("a block has 1 to 1024 threads");
  grid_dim = grid;
  block_dim = threads;
  size_t bytes = (shared_bytes + 127) / 128 * 128 + 128;
  unsigned char* mem = static_cast<unsigned char*>(std::aligned_alloc(128, bytes));
  if (!mem) fail("out of memory for shared memory");
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        std::memset(mem, 0xff, bytes);  // NaN floats
        dynamic_shared = mem;
        Block b(n);
        std::vector<std::thread> ts;
        ts.reserve(n);
        for (unsigned i = 0; i < n; i++)
          ts.emplace_back([&, i] {
            thread_idx = {i % threads.x, i / threads.x % threads.y, i / (threads.x * threads.y)};
            block_idx = {bx, by, bz};
            block = &b;
            kernel();
            b.warps[i / 32]->arrive_and_drop();
            b.all.arrive_and_drop();
          });
        for (auto& t : ts) t.join();
      }
  std::free(mem);
  dynamic_shared = nullptr;
}

template <class T>
T exchange(T v, int from_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  unsigned me = linear_thread(), lane = me % 32, base = me - lane;
  std::memcpy(&block->slots[me], &v, sizeof(T));
  warp_barrier().arrive_and_wait();
  unsigned src = base + static_cast<unsigned>(from_lane);
  if (from_lane < 0 || from_lane >= 32 || src >= block->slots.size()) src = me;
  T r;
  std::memcpy(&r, &block->slots[src], sizeof(T));
  warp_barrier().arrive_and_wait();
  return r;
}

}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define LMKIT_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier().arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return emu::exchange(v, static_cast<int>(emu::linear_thread() % 32) ^ mask);
}

template <class T>
T __shfl_sync(unsigned, T v, int lane, int = 32) {
  return emu::exchange(v, lane);
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
using std::max;
using std::min;

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
  float at(int r, int c) const { return x[r * cols + c]; }
};

// Round to nearest (ties away from zero) at TF32's 10 mantissa bits, as cvt.rna.tf32.f32 does.
inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float tf32_truncate(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void check_operand(const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma: pointer not 256-bit aligned");
  if (ldm % 4 != 0) emu::fail("wmma: leading dimension not a multiple of 4 floats");
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators load with a layout");
  check_operand(p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; r++)
    for (int c = 0; c < F::cols; c++)
      f.x[r * F::cols + c] =
          std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const float* p, unsigned ldm,
                      layout_t l) {
  check_operand(p, ldm);
  for (int r = 0; r < M; r++)
    for (int c = 0; c < N; c++)
      f.x[r * N + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, class T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t l) {
  check_operand(p, ldm);
  __syncwarp();
  if (emu::linear_thread() % 32 == 0)
    for (int r = 0; r < M; r++)
      for (int c = 0; c < N; c++)
        (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
  __syncwarp();
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool tf32 = std::is_same_v<T, precision::tf32>;
  float out[M * N];
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; k++) {
        float x = a.at(i, k), y = b.at(k, j);
        if (tf32) {
          x = tf32_truncate(x);
          y = tf32_truncate(y);
        }
        s = std::fma(x, y, s);
      }
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda

// attention_bf16.cu's primitives.

// Rounds to bf16 (to nearest, ties to even; NaN stays NaN) as cvt.rn.bf16 does: the top 16 bits.
inline uint16_t emu_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float emu_from_bf16(uint32_t bits) {
  uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t(emu_bf16(lo)) | uint32_t(emu_bf16(hi)) << 16;
}

inline uint32_t load_pair(const uint16_t* p) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("a bf16 pair not 4-byte aligned");
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void store_pair(uint16_t* p, uint32_t v) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("a bf16 pair not 4-byte aligned");
  std::memcpy(p, &v, 4);
}

// d += a·b, mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 over the warp. Lane L (group
// g = L/4, t = L%4) holds: a[r] = A[g + 8·(r%2)][2t + 8·(r/2) + {0, 1}] (low half first),
// b[r] = B[2t + 8r + {0, 1}][g], d[e] = D[g + 8·(e/2)][2t + e%2].
inline void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  unsigned me = emu::linear_thread(), lane = me % 32, base = me - lane;
  if (base + 32 > emu::block->mma.size())
    emu::fail("mma.sync needs a whole warp");
  auto& mine = emu::block->mma[me];
  for (int i = 0; i < 4; i++) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  __syncwarp();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; l++) {
    const auto& s = emu::block->mma[base + l];
    unsigned g = l / 4, t = l % 4;
    for (unsigned r = 0; r < 4; r++)
      for (unsigned h = 0; h < 2; h++)
        A[g + 8 * (r % 2)][2 * t + 8 * (r / 2) + h] = emu_from_bf16((s[r] >> (16 * h)) & 0xffffu);
    for (unsigned r = 0; r < 2; r++)
      for (unsigned h = 0; h < 2; h++)
        B[2 * t + 8 * r + h][g] = emu_from_bf16((s[4 + r] >> (16 * h)) & 0xffffu);
  }
  __syncwarp();
  unsigned g = lane / 4, t = lane % 4;
  for (unsigned e = 0; e < 4; e++) {
    unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = d[e];
    for (int k = 0; k < 16; k++) acc = std::fma(A[row][k], B[k][col], acc);
    d[e] = acc;
  }
}
