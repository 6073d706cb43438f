// A CPU stand-in for the parts of CUDA that lmkit's kernels use, so that their source — the .cu
// files the GPU runs — compiles with a C++20 compiler and can be checked where there is no GPU
// (tests/parity/test_cuda_kernels.py, and the `cuda-emu` feature's GPU: cuda/emulated.cpp).
//
// Each block's threads run as contexts on one OS thread, one block at a time, so a `__shared__`
// array (static here) belongs to the running block. __syncthreads and __syncwarp are barriers; a
// thread that returns leaves both. The warps run one after another, each as far as it can before
// the next (to the next __syncthreads), every other block in the opposite order: as far apart as
// a GPU may let them drift, so a missing __syncthreads shows, before a tile's use (reads of what
// other warps have not written yet) or before its reload (a tile overwritten while another warp
// still reads it). Warp shuffles exchange through per-thread slots between two warp
// barriers. Dynamic shared memory is filled with NaNs before each block, so a kernel that reads
// what it never wrote shows it. `mma_bf16` and `mma_tf32` (attention.cu's mma.sync m16n8k16
// and m16n8k8) are warp-collective as on the GPU: every lane posts its fragment registers, the
// product is assembled from all 32 lanes by the PTX ISA's fragment layouts, and each lane takes
// back its own four results — so a kernel that gets the layouts wrong fails here as it would
// there; TF32 products drop each input's low 13 mantissa bits as the tensor cores do, and
// bf16 pairs must be 4-byte aligned. `ldmatrix` (the ldsm_* loads) is warp-collective too, with
// its rows' 16-byte alignment checked.
#pragma once

#include <math.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

// A barrier: `alive` threads take part (a thread that returns leaves it), `arrived` wait, and
// `gen` counts its releases.
struct Sync {
  unsigned alive = 0, arrived = 0;
  uint64_t gen = 0;
};

// cp.async's copies: one of 16 bytes (from `src`, or zeros without one) into shared memory.
struct Copy {
  unsigned char* dst;
  const unsigned char* src;
};

struct Block {
  Sync all;
  std::vector<Sync> warps;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
  std::vector<std::array<uint32_t, 10>> mma;  // one mma.sync operand slot per thread
  // Per thread: cp.async copies not yet committed, and the committed groups not yet waited for.
  std::vector<std::vector<Copy>> copies_open;
  std::vector<std::vector<std::vector<Copy>>> copy_groups;
  explicit Block(unsigned n) : slots(n), mma(n), copies_open(n), copy_groups(n) {
    all.alive = n;
    for (unsigned w = 0; w * 32 < n; w++) warps.push_back(Sync{std::min(32u, n - w * 32), 0, 0});
  }
};

// The running block and thread (the scheduler sets them before it resumes a thread).
inline dim3 thread_idx, block_idx, block_dim, grid_dim;
inline Block* block = nullptr;
inline unsigned current = 0;
inline unsigned char* dynamic_shared = nullptr;
// Whether the running block's cp.async copies land at once (else at the wait that covers them).
inline bool eager_copies = false;

// What the scheduler watches: every arrival at a barrier, release and return counts as
// progress; `finished`: the thread it resumed has returned.
inline uint64_t progress = 0;
inline bool finished = false;
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

inline unsigned linear_thread() { return current; }

// Bytes of stack each emulated thread has.
constexpr size_t STACK = 256 << 10;

inline void thread_entry();

#if defined(__x86_64__)
// Context switches without a system call (swapcontext saves and restores the signal mask, which
// would cost most of the emulation's time): the callee-saved registers go on the old stack,
// whose pointer is stored in *save, and come off the new one.
extern "C" void lmkit_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl lmkit_emu_switch
  .hidden lmkit_emu_switch
  .type lmkit_emu_switch, @function
lmkit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lmkit_emu_switch, .-lmkit_emu_switch
)");

inline void* scheduler_sp = nullptr;
inline std::vector<void*> thread_sp;

inline void prepare_threads(unsigned n) { thread_sp.assign(n, nullptr); }

// A new thread on `stack`: its first switch "returns" into thread_entry with the stack aligned
// as at a call (rsp + 8 a multiple of 16).
inline void make_thread(unsigned i, unsigned char* stack) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + STACK) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // thread_entry's return address: it never returns
  *--sp = reinterpret_cast<void*>(&thread_entry);
  for (int r = 0; r < 6; r++) *--sp = nullptr;  // rbp, rbx, r12-r15
  thread_sp[i] = sp;
}

inline void to_thread(unsigned i) { lmkit_emu_switch(&scheduler_sp, thread_sp[i]); }
inline void to_scheduler() { lmkit_emu_switch(&thread_sp[current], scheduler_sp); }
#else
#include <ucontext.h>

inline ucontext_t scheduler;
inline std::vector<ucontext_t> fibers;

inline void prepare_threads(unsigned n) { fibers.assign(n, ucontext_t{}); }

inline void make_thread(unsigned i, unsigned char* stack) {
  ucontext_t& f = fibers[i];
  if (getcontext(&f) != 0) fail("getcontext");
  f.uc_stack.ss_sp = stack;
  f.uc_stack.ss_size = STACK;
  f.uc_link = nullptr;
  makecontext(&f, thread_entry, 0);
}

inline void to_thread(unsigned i) {
  if (swapcontext(&scheduler, &fibers[i]) != 0) fail("swapcontext");
}
inline void to_scheduler() {
  if (swapcontext(&fibers[current], &scheduler) != 0) fail("swapcontext");
}
#endif

// Waits until every thread taking part has arrived.
inline void wait(Sync& s) {
  progress++;
  uint64_t g = s.gen;
  if (++s.arrived == s.alive) {
    s.arrived = 0;
    s.gen++;
    return;
  }
  while (s.gen == g) to_scheduler();  // the block's other threads run meanwhile
}

// A returning thread leaves `s`; the others may now all be waiting.
inline void leave(Sync& s) {
  progress++;
  s.alive--;
  if (s.alive > 0 && s.arrived == s.alive) {
    s.arrived = 0;
    s.gen++;
  }
}

inline Sync& warp_sync() { return block->warps[linear_thread() / 32]; }

inline void thread_entry() {
  body(body_arg);
  leave(warp_sync());
  leave(block->all);
  finished = true;
  to_scheduler();  // never resumed
  fail("a finished thread was resumed");
}

// The threads' stacks, kept from launch to launch (pages once touched stay mapped), for
// `stacks_for` threads.
inline std::unique_ptr<unsigned char[]> stacks;
inline unsigned stacks_for = 0;

// The scheduler's state, in globals rather than locals: with ucontext, swapcontext returns into
// the scheduler as setjmp would, so nothing it keeps may live only in registers.
inline unsigned live = 0, warp_at = 0, warp_now = 0;
inline uint64_t progress_before = 0, progress_warp = 0, blocks_run = 0;
inline std::vector<char> done;

// Runs the current block's `block_dim` threads, each on a context of its own, until all return,
// a warp at a time: each warp runs as far as it can (its lanes in turn, until all of them wait
// at a __syncthreads or have returned) before the next, so warps drift as far apart between
// two __syncthreads as a GPU allows, and a missing one shows; every other block takes the warps
// in the opposite order.
inline void run_block() {
  unsigned n = block_dim.x * block_dim.y * block_dim.z, warps = (n + 31) / 32;
  done.assign(n, 0);
  for (unsigned i = 0; i < n; i++) make_thread(i, stacks.get() + size_t(i) * STACK);
  live = n;
  // Every other block takes the warps in reverse order; every other pair lands its cp.async
  // copies at once.
  eager_copies = blocks_run / 2 % 2 == 1;
  bool reverse = blocks_run++ % 2 == 1;
  while (live > 0) {
    progress_before = progress;
    for (warp_at = 0; warp_at < warps; warp_at++) {
      warp_now = reverse ? warps - 1 - warp_at : warp_at;
      do {
        progress_warp = progress;
        for (current = warp_now * 32; current < std::min(n, warp_now * 32 + 32); current++) {
          if (done[current]) continue;
          unsigned i = current, x = block_dim.x, y = block_dim.y;
          thread_idx = {i % x, i / x % y, i / (x * y)};
          finished = false;
          to_thread(current);
          if (finished) {
            done[current] = 1;
            live--;
          }
        }
      } while (progress != progress_warp);
    }
    if (live > 0 && progress == progress_before)
      fail("deadlock: the block's threads wait at different barriers");
  }
}

// Runs `kernel()` as a grid of `grid` blocks of `threads` threads with `shared_bytes` of dynamic
// shared memory, one block at a time. A block's threads are contexts of their own on one OS
// thread, resumed in turn by a scheduler: a thread runs until it waits at a barrier or returns,
// so barriers and warp exchanges cost a context switch, not an OS thread's wake-up. Threads that
// wait at different barriers forever (a __syncthreads a thread skips) stop the run with a
// message. Not reentrant: one launch at a time per process.
template <class F>
void launch(dim3 grid, dim3 threads, size_t shared_bytes, F kernel) {
  unsigned n = threads.x * threads.y * threads.z;
  if (n == 0 || n > 1024) fail("a block has 1 to 1024 threads");
  grid_dim = grid;
  block_dim = threads;
  size_t bytes = (shared_bytes + 127) / 128 * 128 + 128;
  unsigned char* mem = static_cast<unsigned char*>(std::aligned_alloc(128, bytes));
  if (!mem) fail("out of memory for shared memory");
  dynamic_shared = mem;
  if (stacks_for < n) {
    stacks.reset(new unsigned char[size_t(n) * STACK]);
    stacks_for = n;
  }
  prepare_threads(n);
  body = [](void* k) { (*static_cast<F*>(k))(); };
  body_arg = &kernel;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        std::memset(mem, 0xff, bytes);  // NaN floats
        Block b(n);
        block = &b;
        block_idx = {bx, by, bz};
        run_block();
      }
  block = nullptr;
  std::free(mem);
  dynamic_shared = nullptr;
}

template <class T>
T exchange(T v, int from_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  unsigned me = linear_thread(), lane = me % 32, base = me - lane;
  std::memcpy(&block->slots[me], &v, sizeof(T));
  wait(warp_sync());
  unsigned src = base + static_cast<unsigned>(from_lane);
  if (from_lane < 0 || from_lane >= 32 || src >= block->slots.size()) src = me;
  T r;
  std::memcpy(&r, &block->slots[src], sizeof(T));
  wait(warp_sync());
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

inline void __syncthreads() { emu::wait(emu::block->all); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::warp_sync()); }

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

// attention.cu's primitives.

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

inline void store_pair(uint16_t* p, uint32_t v) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("a bf16 pair not 4-byte aligned");
  std::memcpy(p, &v, 4);
}

namespace emu {
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16: lanes 8m..8m+7 give the row
// addresses (16-byte aligned) of matrix m; lane L receives row L/4, elements 2·(L%4) and
// 2·(L%4) + 1 of each (transposed: column L/4 of rows 2·(L%4) and 2·(L%4) + 1), low half first.
template <int N, bool TRANS>
void ldmatrix(uint32_t* r, const uint16_t* row) {
  unsigned me = linear_thread(), lane = me % 32, base = me - lane;
  if (base + 32 > block->slots.size()) fail("ldmatrix needs a whole warp");
  std::memcpy(&block->slots[me], &row, sizeof row);
  __syncwarp();
  auto row_of = [&](int m, unsigned i) {
    const uint16_t* p;
    std::memcpy(&p, &block->slots[base + 8 * m + i], sizeof p);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix: a row not 16-byte aligned");
    return p;
  };
  unsigned g = lane / 4, t = lane % 4;
  for (int m = 0; m < N; m++) {
    uint32_t lo, hi;
    if (TRANS) {
      lo = row_of(m, 2 * t)[g];
      hi = row_of(m, 2 * t + 1)[g];
    } else {
      lo = row_of(m, g)[2 * t];
      hi = row_of(m, g)[2 * t + 1];
    }
    r[m] = lo | hi << 16;
  }
  __syncwarp();
}
}  // namespace emu

namespace emu {
inline void land(const Copy& c) {
  if (c.src) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}
}  // namespace emu

// cp.async.cg.shared.global [dst], [src], 16, (valid ? 16 : 0): both addresses 16-byte aligned.
// On a GPU the copy lands at some time before the thread's wait_group that covers it; here it
// lands either at that wait (so a tile read before the wait, or before the barrier after it,
// shows the poisoned shared memory) or at once (so a refill of a buffer other warps still read,
// without a barrier between, overwrites it under them): the two alternate between pairs of
// blocks.
inline void cp_async16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    emu::fail("cp.async: an address not 16-byte aligned");
  emu::Copy c{static_cast<unsigned char*>(dst),
              valid ? static_cast<const unsigned char*>(src) : nullptr};
  if (emu::eager_copies) emu::land(c);
  else emu::block->copies_open[emu::linear_thread()].push_back(c);
}

inline void cp_async_commit() {
  unsigned me = emu::linear_thread();
  auto& open = emu::block->copies_open[me];
  emu::block->copy_groups[me].push_back(std::move(open));
  open.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& groups = emu::block->copy_groups[emu::linear_thread()];
  while (groups.size() > N) {
    for (const emu::Copy& c : groups.front()) emu::land(c);
    groups.erase(groups.begin());
  }
}

inline void ldsm_x4(uint32_t* r, const uint16_t* row) { emu::ldmatrix<4, false>(r, row); }
inline void ldsm_x2(uint32_t* r, const uint16_t* row) { emu::ldmatrix<2, false>(r, row); }
inline void ldsm_x2_trans(uint32_t* r, const uint16_t* row) { emu::ldmatrix<2, true>(r, row); }

inline uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Rounds to TF32's 10 mantissa bits, to nearest with ties away from zero (cvt.rna.tf32.f32).
inline uint32_t tf32_bits(float f) {
  uint32_t u = bits(f);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

namespace emu {
// An mma.sync over the warp: every lane posts its A and B registers, then each computes its
// four results of D = A·B + D from the [16, K]·[K, 8] product assembled by
// `a_at(lane, reg, half)` and `b_at(lane, reg, half)`, the (row, column) of each lane's register
// halves (`halves` per register: 2 for bf16 pairs, 1 for TF32), read by `value(reg, half)`.
template <int K, class AAt, class BAt, class Value>
void warp_mma(float* d, const uint32_t* a, const uint32_t* b, int halves, AAt a_at, BAt b_at,
              Value value) {
  unsigned me = linear_thread(), lane = me % 32, base = me - lane;
  if (base + 32 > block->mma.size()) fail("mma.sync needs a whole warp");
  auto& mine = block->mma[me];
  for (int i = 0; i < 4; i++) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  __syncwarp();
  float A[16][K], B[K][8];
  for (unsigned l = 0; l < 32; l++) {
    const auto& s = block->mma[base + l];
    for (int r = 0; r < 4; r++)
      for (int h = 0; h < halves; h++) {
        auto [row, col] = a_at(l, r, h);
        A[row][col] = value(s[r], h);
      }
    for (int r = 0; r < 2; r++)
      for (int h = 0; h < halves; h++) {
        auto [row, col] = b_at(l, r, h);
        B[row][col] = value(s[4 + r], h);
      }
  }
  __syncwarp();
  unsigned g = lane / 4, t = lane % 4;
  for (unsigned e = 0; e < 4; e++) {
    unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = d[e];
    for (int k = 0; k < K; k++) acc = std::fma(A[row][k], B[k][col], acc);
    d[e] = acc;
  }
}
}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32. Lane L (g = L/4, t = L%4) holds
// a[r] = A[g + 8·(r%2)][2t + 8·(r/2) + {0, 1}] (low half first), b[r] = B[2t + 8r + {0, 1}][g],
// d[e] = D[g + 8·(e/2)][2t + e%2].
inline void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  struct At {
    unsigned row, col;
  };
  emu::warp_mma<16>(
      d, a, b, 2,
      [](unsigned l, int r, int h) { return At{l / 4 + 8 * (r % 2), 2 * (l % 4) + 8 * (r / 2) + h}; },
      [](unsigned l, int r, int h) { return At{2 * (l % 4) + 8 * r + h, l / 4}; },
      [](uint32_t v, int h) { return emu_from_bf16((v >> (16 * h)) & 0xffffu); });
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: a[r] = A[g + 8·(r%2)][t + 4·(r/2)],
// b[r] = B[t + 4r][g]; the tensor cores read the top 19 bits of each operand.
inline void mma_tf32(float* d, const uint32_t* a, const uint32_t* b) {
  struct At {
    unsigned row, col;
  };
  emu::warp_mma<8>(
      d, a, b, 1,
      [](unsigned l, int r, int) { return At{l / 4 + 8 * (r % 2), l % 4 + 4 * (r / 2)}; },
      [](unsigned l, int r, int) { return At{l % 4 + 4 * r, l / 4}; },
      [](uint32_t v, int) { return from_bits(v & 0xffffe000u); });
}
