// Flash-style causal attention on the tensor cores, with TF32 operands or (for
// `train.dtype = "bf16"`) bf16 operands; f32 accumulation and softmax either way. The forward
// pass keeps one log-sum-exp per query row instead of the [t, t] probabilities; the backward
// pass recomputes the probabilities a tile at a time (one kernel for dQ over the keys, one for dK
// and dV over the queries: no atomics, the same result every run). Grouped-query attention:
// query head h reads key/value head h / (heads / kv_heads).
//
// Operands are row-major [b·t, ld] matrices, each with its own leading dimension `ld`; head h's
// HD columns start at h·HD (key/value heads at kvh·HD), so GPT-2's packed q|k|v [b·t, 3c] is read
// in place (q at column 0, k at c, v at 2c; ld = 3c). lse and the row dots d are [b, heads, t].
//
// The products are warp-wide mma.sync tiles (m16n8k8 TF32, m16n8k16 bf16) whose f32
// accumulators stay in registers: the softmax runs on them, and the probabilities (or dS)
// become the next product's A operand without a trip through shared memory, which holds only
// the operand tiles (rounded to TF32 or bf16 as they are loaded). A block of 4 warps owns 64
// rows, 16 per warp; in a warp, lane L holds rows L/4 and L/4 + 8 of the warp's 16 and columns
// 2·(L%4) and 2·(L%4) + 1 of every 8 (the PTX ISA's m16n8 accumulator layout), so a row's
// statistics are reduced over the 4 lanes that share it.

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#define LMKIT_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]

// The tensor-core instructions need compute capability 8.0; for older targets they are left out
// and the flash kernels are not used (cuda.rs checks the GPU before launching them).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ATT_MMA 1
#endif

// d += a·b over the warp: a [16, 16] bf16 (4 registers of pairs per lane), b [16, 8] (2), d
// [16, 8] f32 (4 per lane).
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
#ifdef ATT_MMA
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += a·b over the warp: a [16, 8] TF32 (4 registers per lane), b [8, 8] (2), d [16, 8] f32.
__device__ __forceinline__ void mma_tf32(float* d, const uint32_t* a, const uint32_t* b) {
#ifdef ATT_MMA
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// x rounded to TF32 (to nearest, ties away from zero: cvt.rna), as the bits of an f32.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t u;
#ifdef ATT_MMA
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(x));
#else
  u = __float_as_uint(x);
#endif
  return u;
}

// lo and hi rounded to bf16 (to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void store_pair(uint16_t* p, uint32_t v) {
  *reinterpret_cast<uint32_t*>(p) = v;
}

// ldmatrix: the warp loads 8x8 matrices of 16-bit elements from shared memory, one per register,
// each lane giving the address of one matrix row (lanes 8m..8m+7: matrix m's rows). Lane L gets
// row L/4, columns 2·(L%4) and 2·(L%4) + 1 of each matrix; transposed (`_trans`), column L/4,
// rows 2·(L%4) and 2·(L%4) + 1.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const uint16_t* row) {
#ifdef ATT_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#endif
}

__device__ __forceinline__ void ldsm_x2(uint32_t* r, const uint16_t* row) {
#ifdef ATT_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#endif
}

__device__ __forceinline__ void ldsm_x2_trans(uint32_t* r, const uint16_t* row) {
#ifdef ATT_MMA
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#endif
}

// cp.async.cg: 16 bytes from global to shared memory (both 16-byte aligned), zeros where
// !valid (no source bytes read), completing in the background: commit_group closes a group of
// copies, wait_group<N> waits until at most the newest N groups are still in flight.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef ATT_MMA
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   (uint32_t)__cvta_generic_to_shared(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef ATT_MMA
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef ATT_MMA
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ uint32_t bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ float from_bits(uint32_t u) { return __uint_as_float(u); }
#endif

#define ATT_LOG2E 1.4426950408889634f
#define ATT_ROWS 64  // rows a block owns
#define ATT_THREADS 128

// d[b, h, i] = Σ dO[i, h] ⊙ O[i, h] over the head's HD columns: a warp per (row, head); dO and
// O f32, or both bf16 (attn_row_dots_h16: the bf16-input kernels' gradient and output).
__device__ __forceinline__ float elem(float x) { return x; }
__device__ __forceinline__ float elem(uint16_t x) { return from_bits((uint32_t)x << 16); }

template <class S, class O>
__device__ void row_dots(float* d, const S* dout, const O* out, int n, int t, int heads, int hd,
                         int ldd, int ldo) {
  int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (w >= (int64_t)n * heads) return;
  int r = w / heads, h = w % heads;
  const S* a = dout + (int64_t)r * ldd + h * hd;
  const O* b = out + (int64_t)r * ldo + h * hd;
  float s = 0.0f;
  for (int j = lane; j < hd; j += 32) s += elem(a[j]) * elem(b[j]);
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) d[((int64_t)(r / t) * heads + h) * t + r % t] = s;
}

extern "C" __global__ void attn_row_dots(float* d, const float* dout, const float* out, int n,
                                         int t, int heads, int hd, int ldd, int ldo) {
  row_dots(d, dout, out, n, t, heads, hd, ldd, ldo);
}

extern "C" __global__ void attn_row_dots_h16(float* d, const uint16_t* dout,
                                             const uint16_t* out, int n, int t, int heads, int hd,
                                             int ldd, int ldo) {
  row_dots(d, dout, out, n, t, heads, hd, ldd, ldo);
}

// The operand precisions: the tiles' element type and row padding, the mma's k, and the
// fragments of the PTX ISA's layouts (lane L: g = L/4, c = L%4).
//
// A fragments are rows r0..r0+15 and columns c0.. of a tile; `frag_bt` is the B fragment of
// B[k][n] = X[n0 + n][k0 + k] (a tile's transpose), `frag_b` of B[k][n] = X[k0 + k][n0 + n];
// `frag_a_acc` makes the A fragment of k block kk from a warp's [16, N] accumulators (acc[j]:
// columns 8j..8j+7), pairing with `frag_b`'s rows.
struct Bf16 {
  typedef uint16_t T;
  static constexpr int K = 16, PAD = 8;  // PAD: elements after each tile row
  static __device__ __forceinline__ void store2(T* p, float x0, float x1) {
    store_pair(p, pack_bf16x2(x0, x1));
  }
  // a[r] = A[g + 8·(r%2)][2c + 8·(r/2) + {0, 1}]: four 8x8 matrices, lanes 8m..8m+7 giving
  // matrix m's rows (rows + 8 for odd m, columns + 8 for m ≥ 2).
  static __device__ __forceinline__ void frag_a(uint32_t* a, const T* tile, int ld, int r0,
                                                int c0) {
    int lane = threadIdx.x % 32, m = lane / 8;
    ldsm_x4(a, tile + (r0 + lane % 8 + 8 * (m % 2)) * ld + c0 + 8 * (m / 2));
  }
  // b[r] = B[2c + 8r + {0, 1}][g]: X's rows n0.. at columns k0 and k0 + 8.
  static __device__ __forceinline__ void frag_bt(uint32_t* b, const T* x, int ld, int n0,
                                                 int k0) {
    int lane = threadIdx.x % 32;
    ldsm_x2(b, x + (n0 + lane % 8) * ld + k0 + 8 * (lane / 8 % 2));
  }
  // X's rows k0..k0+15 at column n0, transposed.
  static __device__ __forceinline__ void frag_b(uint32_t* b, const T* x, int ld, int k0,
                                                int n0) {
    int lane = threadIdx.x % 32;
    ldsm_x2_trans(b, x + (k0 + lane % 16) * ld + n0);
  }
  // k block kk spans accumulator blocks 2kk and 2kk + 1, whose elements each lane holds in A's
  // places.
  static __device__ __forceinline__ void frag_a_acc(uint32_t* a, const float (*acc)[4], int kk) {
    a[0] = pack_bf16x2(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = pack_bf16x2(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = pack_bf16x2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = pack_bf16x2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
  static __device__ __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
    mma_bf16(d, a, b);
  }
};

struct Tf32 {
  typedef float T;
  static constexpr int K = 8, PAD = 4;
  static __device__ __forceinline__ void store2(T* p, float x0, float x1) {
    p[0] = from_bits(tf32_bits(x0));
    p[1] = from_bits(tf32_bits(x1));
  }
  // a[r] = A[g + 8·(r%2)][c + 4·(r/2)]
  static __device__ __forceinline__ void frag_a(uint32_t* a, const T* tile, int ld, int r0,
                                                int c0) {
    int lane = threadIdx.x % 32;
    const T* p = tile + (r0 + lane / 4) * ld + c0 + lane % 4;
    a[0] = bits(p[0]);
    a[1] = bits(p[8 * ld]);
    a[2] = bits(p[4]);
    a[3] = bits(p[8 * ld + 4]);
  }
  // b[r] = B[c + 4r][g]
  static __device__ __forceinline__ void frag_bt(uint32_t* b, const T* x, int ld, int n0,
                                                 int k0) {
    int lane = threadIdx.x % 32;
    const T* p = x + (n0 + lane / 4) * ld + k0 + lane % 4;
    b[0] = bits(p[0]);
    b[1] = bits(p[4]);
  }
  // The k block's rows in the order `frag_a_acc` gives its columns: B row c is X's row k0 + 2c,
  // B row c + 4 is X's row k0 + 2c + 1 (a sum over k is the same in any order).
  static __device__ __forceinline__ void frag_b(uint32_t* b, const T* x, int ld, int k0,
                                                int n0) {
    int lane = threadIdx.x % 32;
    const T* p = x + (k0 + lane % 4 * 2) * ld + n0 + lane / 4;
    b[0] = bits(p[0]);
    b[1] = bits(p[ld]);
  }
  // k block kk is accumulator block kk: the lane's columns 2c and 2c + 1 as A's columns c and
  // c + 4, rounded to TF32.
  static __device__ __forceinline__ void frag_a_acc(uint32_t* a, const float (*acc)[4], int kk) {
    a[0] = tf32_bits(acc[kk][0]);
    a[1] = tf32_bits(acc[kk][2]);
    a[2] = tf32_bits(acc[kk][1]);
    a[3] = tf32_bits(acc[kk][3]);
  }
  static __device__ __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
    mma_tf32(d, a, b);
  }
};

// rows × HD of a [b·t, ld] f32 operand from row r0 into a tile of P's elements (row stride
// HD + pad); rows at or past t become zeros.
template <class P, int HD>
__device__ __forceinline__ void load_tile(typename P::T* tile, int rows, const float* src,
                                          int64_t ld, int r0, int t) {
  for (int i = threadIdx.x; i < rows * (HD / 2); i += ATT_THREADS) {
    int r = i / (HD / 2), d = i % (HD / 2) * 2;
    float x0 = 0.0f, x1 = 0.0f;
    if (r0 + r < t) {
      const float* p = src + (int64_t)(r0 + r) * ld + d;
      x0 = p[0];
      x1 = p[1];
    }
    P::store2(tile + r * (HD + P::PAD) + d, x0, x1);
  }
}

// acc[m][j] += A_m·Xᵀ over K columns for MT row blocks m: A_m = rows ar0 + 16m.. of tile a, X
// = the N rows of tile x. Each B fragment, loaded once, serves the MT blocks (a warp with more
// rows reads X from shared memory fewer times per product).
template <class P, int K, int N, int MT>
__device__ __forceinline__ void mma_abt_m(float (*acc)[N / 8][4], const typename P::T* a,
                                          int lda, int ar0, const typename P::T* x, int ldx) {
#pragma unroll
  for (int kk = 0; kk < K; kk += P::K) {
    uint32_t fa[MT][4];
#pragma unroll
    for (int m = 0; m < MT; m++) P::frag_a(fa[m], a, lda, ar0 + 16 * m, kk);
#pragma unroll
    for (int j = 0; j < N / 8; j++) {
      uint32_t fb[2];
      P::frag_bt(fb, x, ldx, j * 8, kk);
#pragma unroll
      for (int m = 0; m < MT; m++) P::mma(acc[m][j], fa[m], fb);
    }
  }
}

// acc[m][j] += P_m·X for MT row blocks m: P_m = the warp's [16, K] accumulators p[m], X = the
// [K, N] tile x.
template <class P, int K, int N, int MT>
__device__ __forceinline__ void mma_px_m(float (*acc)[N / 8][4], const float (*p)[K / 8][4],
                                         const typename P::T* x, int ldx) {
#pragma unroll
  for (int kk = 0; kk < K / P::K; kk++) {
    uint32_t fa[MT][4];
#pragma unroll
    for (int m = 0; m < MT; m++) P::frag_a_acc(fa[m], p[m], kk);
#pragma unroll
    for (int j = 0; j < N / 8; j++) {
      uint32_t fb[2];
      P::frag_b(fb, x, ldx, kk * P::K, j * 8);
#pragma unroll
      for (int m = 0; m < MT; m++) P::mma(acc[m][j], fa[m], fb);
    }
  }
}

// acc[j] += A·Xᵀ over K columns: A = rows ar0..ar0+15 of tile a, X = the N rows of tile x.
template <class P, int K, int N>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const typename P::T* a, int lda,
                                        int ar0, const typename P::T* x, int ldx) {
  mma_abt_m<P, K, N, 1>(reinterpret_cast<float (*)[N / 8][4]>(acc), a, lda, ar0, x, ldx);
}

// acc[j] += P·X: P = the warp's [16, K] accumulators p, X = the [K, N] tile x.
template <class P, int K, int N>
__device__ __forceinline__ void mma_px(float (*acc)[4], const float (*p)[4],
                                       const typename P::T* x, int ldx) {
  mma_px_m<P, K, N, 1>(reinterpret_cast<float (*)[N / 8][4]>(acc),
                       reinterpret_cast<const float (*)[K / 8][4]>(p), x, ldx);
}

template <int N>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
  for (int j = 0; j < N / 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
}

// The backward kernels' two products for MT row blocks of the warp (rows r0.. of tiles a and
// b): s[m] = A_m·Xᵀ (the scores) and dp[m] = B_m·Yᵀ (dP), over HD columns, X and Y the N rows
// of tiles x and y.
template <class P, int HD, int N, int MT>
__device__ __forceinline__ void scores_and_dp(float (*s)[N / 8][4], float (*dp)[N / 8][4],
                                              const typename P::T* a, const typename P::T* b,
                                              int r0, const typename P::T* x,
                                              const typename P::T* y, int ld) {
#pragma unroll
  for (int mb = 0; mb < MT; mb++) {
    zero<N>(s[mb]);
    zero<N>(dp[mb]);
  }
  mma_abt_m<P, HD, N, MT>(s, a, ld, r0, x, ld);
  mma_abt_m<P, HD, N, MT>(dp, b, ld, r0, y, ld);
}

// Two adjacent output values: f32, or rounded to bf16 (an even column: 4-byte aligned).
__device__ __forceinline__ void store_out(float* p, float x0, float x1) {
  p[0] = x0;
  p[1] = x1;
}
__device__ __forceinline__ void store_out(uint16_t* p, float x0, float x1) {
  store_pair(p, pack_bf16x2(x0, x1));
}

// The lane's two rows (r = 0, 1: rows lane/4 and lane/4 + 8 of the warp's 16) of [16, HD]
// accumulators times `scale` into rows row0 + ... of dst, those below t.
template <int HD, class O>
__device__ __forceinline__ void write_rows(O* dst, int64_t ld, const float (*acc)[4], int row0,
                                             int t, float scale) {
  int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int row = row0 + lane / 4 + 8 * r;
    if (row >= t) continue;
    O* out = dst + (int64_t)row * ld + lane % 4 * 2;
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
      store_out(out + 8 * j, acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale);
  }
}

// The lane's rows in the warp's MT blocks of 16 rows from r0 (the m16n8 accumulator layout):
// block mb's are r0 + 16·mb + lane/4 and that + 8.
template <int MT>
__device__ __forceinline__ void lane_rows(int (*rows)[2], int r0) {
  int lane = threadIdx.x % 32;
#pragma unroll
  for (int mb = 0; mb < MT; mb++)
#pragma unroll
    for (int r = 0; r < 2; r++) rows[mb][r] = r0 + 16 * mb + lane / 4 + 8 * r;
}

// The maximum (or sum) of x over the 4 lanes that hold a row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// rows × HD of a [b·t, ld] bf16 operand from row r0 into a bf16 tile (row stride HD + 8),
// asynchronously: cp.async copies of 16 bytes (the tile is complete once the caller has waited
// for the group it commits them in, and synchronised the block); rows at or past t become zeros.
template <int HD>
__device__ __forceinline__ void copy_tile(uint16_t* tile, int rows, const uint16_t* src,
                                          int64_t ld, int r0, int t) {
  constexpr int CHUNKS = HD / 8;
  for (int i = threadIdx.x; i < rows * CHUNKS; i += ATT_THREADS) {
    int r = i / CHUNKS, d = i % CHUNKS * 8;
    bool in = r0 + r < t;
    cp_async16(tile + r * (HD + Bf16::PAD) + d, src + (in ? (int64_t)(r0 + r) * ld : 0) + d, in);
  }
}

// The kernels' operands in global memory: f32 (`F32In`, rounded to TF32 or bf16 as each tile is
// loaded, then used) or bf16 (`Bf16In`, bf16 products only: tiles copied by cp.async, the next
// tile's copies in flight while the current one is used — two buffers per streamed operand).
template <class P>
struct F32In {
  typedef float S;
  static constexpr int BUFFERS = 1;
  template <int HD>
  static __device__ __forceinline__ void fetch(typename P::T* tile, int rows, const float* src,
                                               int64_t ld, int r0, int t) {
    load_tile<P, HD>(tile, rows, src, ld, r0, t);
  }
  static __device__ __forceinline__ void commit() {}
  // Waits for the tiles fetched before the last `pending` commits.
  static __device__ __forceinline__ void wait(bool) {}
};

struct Bf16In {
  typedef uint16_t S;
  static constexpr int BUFFERS = 2;
  template <int HD>
  static __device__ __forceinline__ void fetch(uint16_t* tile, int rows, const uint16_t* src,
                                               int64_t ld, int r0, int t) {
    copy_tile<HD>(tile, rows, src, ld, r0, t);
  }
  static __device__ __forceinline__ void commit() { cp_async_commit(); }
  static __device__ __forceinline__ void wait(bool pending) {
    if (pending) cp_async_wait<1>();
    else cp_async_wait<0>();
  }
};

// Runs `use(i, b)` on tiles i = 0..tiles-1, each first fetched into buffer b by `fetch(i, b)`:
// with two buffers (bf16 inputs) tile i + 1's copies are in flight while tile i is used. Around
// each use, the wait and barrier that make the tile visible to every warp, and the barrier that
// keeps its buffer until every warp is done with it.
template <class In, class Fetch, class Use>
__device__ __forceinline__ void stream_tiles(int tiles, Fetch fetch, Use use) {
  fetch(0, 0);
  In::commit();
  for (int i = 0; i < tiles; i++) {
    bool more = In::BUFFERS > 1 && i + 1 < tiles;
    if (more) {
      fetch(i + 1, (i + 1) % In::BUFFERS);
      In::commit();
    }
    In::wait(more);
    __syncthreads();
    use(i, i % In::BUFFERS);
    __syncthreads();
    if (In::BUFFERS == 1 && i + 1 < tiles) fetch(i + 1, 0);
  }
}

// The key/value tiles of keys 0..kend-1 (of the head's rows kg of k and vg of v) through the
// buffers sK and sV ([BC, HD + pad] each per buffer): use(k0, tk, tv) on each, tk and tv holding
// keys k0..k0+BC-1 (zeros past t).
template <class P, class In, int HD, int BC, class Use>
__device__ __forceinline__ void stream_kv(typename P::T* sK, typename P::T* sV,
                                          const typename In::S* kg, int ldk,
                                          const typename In::S* vg, int ldv, int kend, int t,
                                          Use use) {
  constexpr int LD = HD + P::PAD;
  auto fetch = [&](int i, int b) {
    In::template fetch<HD>(sK + b * BC * LD, BC, kg, ldk, i * BC, t);
    In::template fetch<HD>(sV + b * BC * LD, BC, vg, ldv, i * BC, t);
  };
  stream_tiles<In>((kend + BC - 1) / BC, fetch,
                   [&](int i, int b) { use(i * BC, sK + b * BC * LD, sV + b * BC * LD); });
}

// Forward: o = softmax(scale · q·kᵀ, causal) · v for each head (of the inputs' type: f32, or
// rounded to bf16 once); lse[b, h, i] = the natural log-sum-exp of row i's scaled scores. Each
// warp owns MT blocks of 16 rows (a block 64·MT rows): with MT = 2 every key and value
// fragment read from shared memory serves two row blocks. Grid (⌈t/(64·MT)⌉, b·heads), 128
// threads.
template <class P, class In, int HD, int BC, int MT>
__device__ void flash_fwd(const typename In::S* q, const typename In::S* k,
                          const typename In::S* v, typename In::S* o, float* lse, int t,
                          int heads, int kv_heads, int ldq, int ldk, int ldv, int ldo,
                          float scale) {
  constexpr int LD = HD + P::PAD, ROWS = ATT_ROWS * MT;
  typedef typename P::T T;
  typedef typename In::S S;
  LMKIT_DYNAMIC_SHARED(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [ROWS, LD]
  T* sK = sQ + ROWS * LD;              // [BC, LD] per buffer
  T* sV = sK + In::BUFFERS * BC * LD;  // [BC, LD] per buffer
  int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;  // the longest rows first
  int bi = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const S* kg = k + (int64_t)bi * t * ldk + kvh * HD;
  const S* vg = v + (int64_t)bi * t * ldv + kvh * HD;
  In::template fetch<HD>(sQ, ROWS, q + (int64_t)bi * t * ldq + h * HD, ldq, q0, t);
  // The warp's first row, and the lane's rows.
  int r0 = q0 + warp * 16 * MT;
  int rows[MT][2];
  lane_rows<MT>(rows, r0);
  // The online softmax's running max (log2 units of the scaled scores) and this lane's part
  // of the running sum, per row.
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mb = 0; mb < MT; mb++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      m[mb][r] = -INFINITY;
      l[mb][r] = 0.0f;
    }
  float acc[MT][HD / 8][4];
#pragma unroll
  for (int mb = 0; mb < MT; mb++) zero<HD>(acc[mb]);
  const float sl = scale * ATT_LOG2E;
  int kend = min(t, q0 + ROWS);
  stream_kv<P, In, HD, BC>(sK, sV, kg, ldk, vg, ldv, kend, t, [&](int k0, const T* tk,
                                                                 const T* tv) {
    float s[MT][BC / 8][4];
#pragma unroll
    for (int mb = 0; mb < MT; mb++) zero<BC>(s[mb]);
    mma_abt_m<P, HD, BC, MT>(s, sQ, LD, warp * 16 * MT, tk, LD);
#pragma unroll
    for (int mb = 0; mb < MT; mb++) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < BC / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int kj = k0 + 8 * j + lane % 4 * 2 + (e & 1), r = e / 2;
          float x = kj <= rows[mb][r] && kj < t ? s[mb][j][e] * sl : -INFINITY;
          s[mb][j][e] = x;
          mx[r] = fmaxf(mx[r], x);
        }
      float base[2], alpha[2];
#pragma unroll
      for (int r = 0; r < 2; r++) {
        float mn = fmaxf(m[mb][r], quad_max(mx[r]));
        base[r] = mn == -INFINITY ? 0.0f : mn;  // rows with nothing yet (past t) stay 0
        alpha[r] = exp2f(m[mb][r] - base[r]);
        m[mb][r] = mn;
        l[mb][r] *= alpha[r];
      }
#pragma unroll
      for (int j = 0; j < BC / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          float p = exp2f(s[mb][j][e] - base[e / 2]);
          s[mb][j][e] = p;
          l[mb][e / 2] += p;
        }
#pragma unroll
      for (int j = 0; j < HD / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[mb][j][e] *= alpha[e / 2];
    }
    mma_px_m<P, BC, HD, MT>(acc, s, tv, LD);
  });
  S* og = o + (int64_t)bi * t * ldo + h * HD;
#pragma unroll
  for (int mb = 0; mb < MT; mb++) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
      float lr = quad_sum(l[mb][r]);
      if (rows[mb][r] < t && lane % 4 == 0)
        lse[(int64_t)blockIdx.y * t + rows[mb][r]] = (m[mb][r] + log2f(lr)) / ATT_LOG2E;
      float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
#pragma unroll
      for (int j = 0; j < HD / 8; j++) {
        acc[mb][j][2 * r] *= inv;
        acc[mb][j][2 * r + 1] *= inv;
      }
    }
    write_rows<HD>(og, ldo, acc[mb], r0 + 16 * mb, t, 1.0f);
  }
}

// dQ = scale · dS·K with dS = P ⊙ (dP − d), dP = dO·Vᵀ, P = exp(scale·q·kᵀ − lse), over the key
// tiles up to the block's last row. Each warp owns MT blocks of 16 rows (a block 64·MT rows).
// Grid (⌈t/(64·MT)⌉, b·heads), 128 threads.
template <class P, class In, int HD, int BC, int MT>
__device__ void flash_bwd_dq(const typename In::S* q, const typename In::S* k,
                             const typename In::S* v, const typename In::S* dout,
                             const float* lse, const float* dvec, float* dq, int t, int heads,
                             int kv_heads, int ldq, int ldk, int ldv, int ldd, int lddq,
                             float scale) {
  constexpr int LD = HD + P::PAD, ROWS = ATT_ROWS * MT;
  typedef typename P::T T;
  typedef typename In::S S;
  LMKIT_DYNAMIC_SHARED(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [ROWS, LD]
  T* sG = sQ + ROWS * LD;              // dO [ROWS, LD]
  T* sK = sG + ROWS * LD;              // [BC, LD] per buffer
  T* sV = sK + In::BUFFERS * BC * LD;  // [BC, LD] per buffer
  int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;
  int bi = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const S* kg = k + (int64_t)bi * t * ldk + kvh * HD;
  const S* vg = v + (int64_t)bi * t * ldv + kvh * HD;
  In::template fetch<HD>(sQ, ROWS, q + (int64_t)bi * t * ldq + h * HD, ldq, q0, t);
  In::template fetch<HD>(sG, ROWS, dout + (int64_t)bi * t * ldd + h * HD, ldd, q0, t);
  // The warp's first row, and the lane's rows.
  int r0 = q0 + warp * 16 * MT;
  int rows[MT][2];
  lane_rows<MT>(rows, r0);
  float lrow[MT][2], drow[MT][2];
#pragma unroll
  for (int mb = 0; mb < MT; mb++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      int64_t stat = (int64_t)blockIdx.y * t + rows[mb][r];
      lrow[mb][r] = rows[mb][r] < t ? lse[stat] * ATT_LOG2E : 0.0f;
      drow[mb][r] = rows[mb][r] < t ? dvec[stat] : 0.0f;
    }
  const float sl = scale * ATT_LOG2E;
  float acc[MT][HD / 8][4];
#pragma unroll
  for (int mb = 0; mb < MT; mb++) zero<HD>(acc[mb]);
  int kend = min(t, q0 + ROWS);
  stream_kv<P, In, HD, BC>(sK, sV, kg, ldk, vg, ldv, kend, t, [&](int k0, const T* tk,
                                                                 const T* tv) {
    float s[MT][BC / 8][4], dp[MT][BC / 8][4];
    scores_and_dp<P, HD, BC, MT>(s, dp, sQ, sG, warp * 16 * MT, tk, tv, LD);
#pragma unroll
    for (int mb = 0; mb < MT; mb++)
#pragma unroll
      for (int j = 0; j < BC / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int kj = k0 + 8 * j + lane % 4 * 2 + (e & 1), r = e / 2;
          bool in = kj <= rows[mb][r] && kj < t && rows[mb][r] < t;
          float p = in ? exp2f(s[mb][j][e] * sl - lrow[mb][r]) : 0.0f;
          s[mb][j][e] = p * (dp[mb][j][e] - drow[mb][r]);
        }
    mma_px_m<P, BC, HD, MT>(acc, s, tk, LD);
  });
#pragma unroll
  for (int mb = 0; mb < MT; mb++)
    write_rows<HD>(dq + (int64_t)bi * t * lddq + h * HD, lddq, acc[mb], r0 + 16 * mb, t, scale);
}

// dV = Σ_h Pᵀ·dO and dK = scale · Σ_h dSᵀ·Q over the query heads h of key/value head kvh and
// the query tiles from the block's first key on. Each warp owns MT blocks of 16 keys (a block
// 64·MT keys). Grid (⌈t/(64·MT)⌉, b·kv_heads), 128 threads.
template <class P, class In, int HD, int BQ, int MT>
__device__ void flash_bwd_dkdv(const typename In::S* q, const typename In::S* k,
                               const typename In::S* v, const typename In::S* dout,
                               const float* lse, const float* dvec, float* dk, float* dv, int t,
                               int heads, int kv_heads, int ldq, int ldk, int ldv, int ldd,
                               int lddk, int lddv, float scale) {
  constexpr int LD = HD + P::PAD, KEYS = ATT_ROWS * MT;
  typedef typename P::T T;
  LMKIT_DYNAMIC_SHARED(smem);
  T* sK = reinterpret_cast<T*>(smem);  // [KEYS, LD]
  T* sV = sK + KEYS * LD;              // [KEYS, LD]
  T* sQ = sV + KEYS * LD;              // [BQ, LD] per buffer
  T* sG = sQ + In::BUFFERS * BQ * LD;  // dO [BQ, LD] per buffer
  // The query tile's lse (log2 units) and row dots [BQ], per buffer.
  float* sL = reinterpret_cast<float*>(sG + In::BUFFERS * BQ * LD);
  float* sD = sL + In::BUFFERS * BQ;
  int k0 = blockIdx.x * KEYS;  // the first keys have the most queries: launched first
  int bi = blockIdx.y / kv_heads, kvh = blockIdx.y % kv_heads, group = heads / kv_heads;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  In::template fetch<HD>(sK, KEYS, k + (int64_t)bi * t * ldk + kvh * HD, ldk, k0, t);
  In::template fetch<HD>(sV, KEYS, v + (int64_t)bi * t * ldv + kvh * HD, ldv, k0, t);
  // The warp's first key, and the lane's keys.
  int w0 = k0 + warp * 16 * MT;
  int keys[MT][2];
  lane_rows<MT>(keys, w0);
  const float sl = scale * ATT_LOG2E;
  float kacc[MT][HD / 8][4], vacc[MT][HD / 8][4];
#pragma unroll
  for (int mb = 0; mb < MT; mb++) {
    zero<HD>(kacc[mb]);
    zero<HD>(vacc[mb]);
  }
  // The query tiles of every query head of the group, one after another: tile i is query
  // head member i / per of the group, rows first + (i % per)·BQ.
  int first = k0 / BQ * BQ, per = (t - first + BQ - 1) / BQ;
  // Fetches tile i's queries, dO rows and statistics into buffer b.
  auto fetch = [&](int i, int b) {
    int h = kvh * group + i / per, q0 = first + i % per * BQ;
    In::template fetch<HD>(sQ + b * BQ * LD, BQ, q + (int64_t)bi * t * ldq + h * HD, ldq, q0, t);
    In::template fetch<HD>(sG + b * BQ * LD, BQ, dout + (int64_t)bi * t * ldd + h * HD, ldd, q0,
                           t);
    const float* lg = lse + ((int64_t)bi * heads + h) * t;
    const float* dg = dvec + ((int64_t)bi * heads + h) * t;
    for (int r = threadIdx.x; r < BQ; r += ATT_THREADS) {
      sL[b * BQ + r] = q0 + r < t ? lg[q0 + r] * ATT_LOG2E : 0.0f;
      sD[b * BQ + r] = q0 + r < t ? dg[q0 + r] : 0.0f;
    }
  };
  stream_tiles<In>(group * per, fetch, [&](int i, int b) {
    int q0 = first + i % per * BQ;
    const T* tq = sQ + b * BQ * LD;
    const T* tg = sG + b * BQ * LD;
    const float* tl = sL + b * BQ;
    const float* td = sD + b * BQ;
    float st[MT][BQ / 8][4], dpt[MT][BQ / 8][4];
    scores_and_dp<P, HD, BQ, MT>(st, dpt, sK, sV, warp * 16 * MT, tq, tg, LD);
#pragma unroll
    for (int mb = 0; mb < MT; mb++)
#pragma unroll
      for (int j = 0; j < BQ / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int c = 8 * j + lane % 4 * 2 + (e & 1), qi = q0 + c, kj = keys[mb][e / 2];
          float p = kj <= qi && qi < t && kj < t ? exp2f(st[mb][j][e] * sl - tl[c]) : 0.0f;
          st[mb][j][e] = p;
          dpt[mb][j][e] = p * (dpt[mb][j][e] - td[c]);
        }
    mma_px_m<P, BQ, HD, MT>(vacc, st, tg, LD);
    mma_px_m<P, BQ, HD, MT>(kacc, dpt, tq, LD);
  });
#pragma unroll
  for (int mb = 0; mb < MT; mb++) {
    write_rows<HD>(dk + (int64_t)bi * t * lddk + kvh * HD, lddk, kacc[mb], w0 + 16 * mb, t, scale);
    write_rows<HD>(dv + (int64_t)bi * t * lddv + kvh * HD, lddv, vacc[mb], w0 + 16 * mb, t, 1.0f);
  }
}

// The kernels: TF32 (flash_*) and bf16 (flash_bf16_*) on f32 operands, and bf16 on bf16
// operands (flash_bf16in_*: q, k, v and dO in bf16, copied by cp.async with the next tile in
// flight), for head sizes 32, 64 and 128. BC: keys per tile of the forward and dQ kernels, BQ:
// queries per tile of the dK/dV kernel (fewer for head size 128: TF32 tiles within 128 KiB of
// shared memory, and the dK/dV kernel's two [16, 128] accumulators take 128 registers a thread).
#define ATT_KERNELS(NAME, P, IN, S, HD, BC, BQ)                                                  \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                      \
      NAME##_fwd_##HD(const S* q, const S* k, const S* v, S* o, float* lse, int t,               \
                      int heads, int kv_heads, int ldq, int ldk, int ldv, int ldo, float scale) { \
    flash_fwd<P, IN, HD, BC, 1>(q, k, v, o, lse, t, heads, kv_heads, ldq, ldk, ldv, ldo, scale); \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) NAME##_bwd_dq_##HD(                  \
      const S* q, const S* k, const S* v, const S* dout, const float* lse, const float* dvec,    \
      float* dq, int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldd, int lddq,   \
      float scale) {                                                                             \
    flash_bwd_dq<P, IN, HD, BC, 1>(q, k, v, dout, lse, dvec, dq, t, heads, kv_heads, ldq, ldk,   \
                                   ldv, ldd, lddq, scale);                                       \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) NAME##_bwd_dkdv_##HD(                \
      const S* q, const S* k, const S* v, const S* dout, const float* lse, const float* dvec,    \
      float* dk, float* dv, int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldd,  \
      int lddk, int lddv, float scale) {                                                         \
    flash_bwd_dkdv<P, IN, HD, BQ, 1>(q, k, v, dout, lse, dvec, dk, dv, t, heads, kv_heads, ldq, \
                                  ldk, ldv, ldd, lddk, lddv, scale);                             \
  }

// The forward and dQ kernels with two row blocks a warp (128 rows a block), for head sizes 32
// and 64 (at 128 the forward's accumulators spill: 255 registers, `ptxas -v` for sm_90); the
// dQ kernel with tiles of 32 keys (of 64 its scores, dP and dQ take more than 255 registers).
#define ATT_ROWS2(NAME, P, IN, S, HD)                                                            \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) NAME##_fwd2_##HD(                    \
      const S* q, const S* k, const S* v, S* o, float* lse, int t, int heads, int kv_heads,      \
      int ldq, int ldk, int ldv, int ldo, float scale) {                                         \
    flash_fwd<P, IN, HD, 64, 2>(q, k, v, o, lse, t, heads, kv_heads, ldq, ldk, ldv, ldo, scale); \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) NAME##_bwd_dq2_##HD(                 \
      const S* q, const S* k, const S* v, const S* dout, const float* lse, const float* dvec,    \
      float* dq, int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldd, int lddq,   \
      float scale) {                                                                             \
    flash_bwd_dq<P, IN, HD, 32, 2>(q, k, v, dout, lse, dvec, dq, t, heads, kv_heads, ldq, ldk,   \
                                   ldv, ldd, lddq, scale);                                       \
  }

// The dK/dV kernel with two blocks of 16 keys a warp (128 keys a block) and tiles of 32
// queries, for bf16 products and head sizes 32 and 64 (with TF32 at 64 it spills).
#define ATT_DKDV2(NAME, P, IN, S, HD)                                                            \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) NAME##_bwd_dkdv2_##HD(               \
      const S* q, const S* k, const S* v, const S* dout, const float* lse, const float* dvec,    \
      float* dk, float* dv, int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldd,  \
      int lddk, int lddv, float scale) {                                                         \
    flash_bwd_dkdv<P, IN, HD, 32, 2>(q, k, v, dout, lse, dvec, dk, dv, t, heads, kv_heads, ldq,  \
                                     ldk, ldv, ldd, lddk, lddv, scale);                          \
  }

ATT_ROWS2(flash, Tf32, F32In<Tf32>, float, 32)
ATT_ROWS2(flash, Tf32, F32In<Tf32>, float, 64)
ATT_ROWS2(flash_bf16, Bf16, F32In<Bf16>, float, 32)
ATT_ROWS2(flash_bf16, Bf16, F32In<Bf16>, float, 64)
ATT_ROWS2(flash_bf16in, Bf16, Bf16In, uint16_t, 32)
ATT_ROWS2(flash_bf16in, Bf16, Bf16In, uint16_t, 64)
ATT_DKDV2(flash_bf16, Bf16, F32In<Bf16>, float, 32)
ATT_DKDV2(flash_bf16, Bf16, F32In<Bf16>, float, 64)
ATT_DKDV2(flash_bf16in, Bf16, Bf16In, uint16_t, 32)
ATT_DKDV2(flash_bf16in, Bf16, Bf16In, uint16_t, 64)

ATT_KERNELS(flash, Tf32, F32In<Tf32>, float, 32, 64, 64)
ATT_KERNELS(flash, Tf32, F32In<Tf32>, float, 64, 64, 64)
ATT_KERNELS(flash, Tf32, F32In<Tf32>, float, 128, 32, 32)
ATT_KERNELS(flash_bf16, Bf16, F32In<Bf16>, float, 32, 64, 64)
ATT_KERNELS(flash_bf16, Bf16, F32In<Bf16>, float, 64, 64, 64)
ATT_KERNELS(flash_bf16, Bf16, F32In<Bf16>, float, 128, 64, 32)
ATT_KERNELS(flash_bf16in, Bf16, Bf16In, uint16_t, 32, 64, 64)
ATT_KERNELS(flash_bf16in, Bf16, Bf16In, uint16_t, 64, 64, 64)
ATT_KERNELS(flash_bf16in, Bf16, Bf16In, uint16_t, 128, 64, 32)

// One decoding step of attention for n sequences that each continue their own KV cache (the
// decoding steps of a serving round): query head h of sequence i sees its cache's first len_i
// positions and its new key and value (key/value head g = h / (heads / kv_heads)), which the
// block of each group's first query head also writes into the cache at position len_i (the
// other blocks take that position from k_new and v_new, and only positions below it from the
// cache, so no block reads what another writes). table[4i .. 4i + 4]: the cache's key and value
// addresses, len_i and the elements between its heads (head g's rows of hd start at g times
// that). q, k_new and v_new: element (head, i, column) at head·*_hs + i·*_ss + column (views of
// the projections' rows are read in place). With `rope` (a [positions, rotated] table: each
// position's cos values, then its sin values), the first `rotated` columns of q and of the new
// key are rotated at position len_i (rotate-half pairs c and c + rotated / 2), as the rotary
// embedding does before the cache. out [n, heads, hd] (sequence-major: the rows o_proj takes).
//
// A block of DEC_THREADS per (sequence, query head, split), the keys a tile of DEC_THREADS at a
// time: one warp per key (lanes over the head's columns, so a key row is read in whole lines), a
// softmax over the tile rescaling the running sums (online softmax), then each thread adds the
// tile's weighted values for its column (the threads split into DEC_THREADS / hd groups of keys
// where hd divides in). With `splits` > 1 (few sequences over long caches: one block per head
// would leave most of the GPU idle), split s of a sequence takes the s-th of `splits` runs of
// whole tiles of its keys and writes its running max, sum and unnormalised output to `partial`
// ([n, heads, splits, 2 + hd]), which decode_combine merges; blockIdx.x = i · splits + s.
#define DEC_THREADS 128
#define DEC_MAX_HD 256

// The decoding kernels read and write f32, or bf16 (a model loaded in bf16: its rows, its cache
// and the output as bf16 bits; the arithmetic in f32, each stored value rounded once).
__device__ __forceinline__ float dec_ld(const float* p) { return *p; }
__device__ __forceinline__ void dec_st(float* p, float v) { *p = v; }
#ifdef __CUDACC__
__device__ __forceinline__ float dec_ld(const uint16_t* p) {
  return __uint_as_float((uint32_t)*p << 16);
}
__device__ __forceinline__ void dec_st(uint16_t* p, float v) {
  *p = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
#else
inline float dec_ld(const uint16_t* p) { return emu_from_bf16(*p); }
inline void dec_st(uint16_t* p, float v) { *p = emu_bf16(v); }
#endif
// v as the element type T stores it.
template <class T>
__device__ __forceinline__ float dec_rounded(float v) {
  T t;
  dec_st(&t, v);
  return dec_ld(&t);
}

__device__ __forceinline__ float dec_reduce(float v, float* shared, bool max) {
  for (int o = 16; o > 0; o /= 2) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = max ? fmaxf(v, w) : v + w;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < DEC_THREADS / 32; w++) v = max ? fmaxf(v, shared[w]) : v + shared[w];
  return v;
}

// x (hd values in shared memory) rotated at table row `row` over its first `rotated` columns.
__device__ __forceinline__ void dec_rotate(float* x, const float* row, int rotated) {
  int half = rotated / 2;
  for (int c = threadIdx.x; c < half; c += DEC_THREADS) {
    float a = x[c], b = x[c + half], cs = row[c], sn = row[half + c];
    x[c] = a * cs - b * sn;
    x[c + half] = b * cs + a * sn;
  }
}

template <class T>
__device__ __forceinline__ void decode_attention_t(T* out, float* partial, const T* q,
                                                   const T* k_new, const T* v_new,
                                                   const uint64_t* table, const float* rope,
                                                   int n, int splits, int heads, int kv_heads,
                                                   int hd, int rotated, int q_hs, int q_ss,
                                                   int k_hs, int k_ss, int v_hs, int v_ss,
                                                   float scale) {
  __shared__ float qs[DEC_MAX_HD];
  __shared__ float kn[DEC_MAX_HD];
  __shared__ float p[DEC_THREADS];
  __shared__ float red[DEC_THREADS / 32];
  __shared__ float parts_acc[DEC_THREADS];
  int i = blockIdx.x / splits, split = blockIdx.x % splits, h = blockIdx.y, tid = threadIdx.x;
  int lane = tid % 32, warp = tid / 32;
  if (i >= n || h >= heads) return;
  int rep = heads / kv_heads, g = h / rep;
  const uint64_t* e = table + 4 * (int64_t)i;
  int64_t head_stride = (int64_t)e[3];
  T* K = reinterpret_cast<T*>(static_cast<uintptr_t>(e[0])) + g * head_stride;
  T* V = reinterpret_cast<T*>(static_cast<uintptr_t>(e[1])) + g * head_stride;
  int len = (int)e[2];
  const T* qr = q + (int64_t)h * q_hs + (int64_t)i * q_ss;
  const T* kr_new = k_new + (int64_t)g * k_hs + (int64_t)i * k_ss;
  const T* vn = v_new + (int64_t)g * v_hs + (int64_t)i * v_ss;
  for (int c = tid; c < hd; c += DEC_THREADS) {
    qs[c] = dec_ld(qr + c);
    kn[c] = dec_ld(kr_new + c);
  }
  if (rope) {
    __syncthreads();
    const float* row = rope + (int64_t)len * rotated;
    dec_rotate(qs, row, rotated);
    dec_rotate(kn, row, rotated);
  }
  __syncthreads();
  for (int c = tid; c < hd; c += DEC_THREADS) {
    // The new key as the cache keeps it (the rotated key rounded, for bf16).
    kn[c] = dec_rounded<T>(kn[c]);
    qs[c] *= scale;
    if (h % rep == 0 && split == 0) {
      dec_st(K + (int64_t)len * hd + c, kn[c]);
      V[(int64_t)len * hd + c] = vn[c];
    }
  }
  // Value columns: thread tid adds column tid % hd over the keys j ≡ tid / hd (mod parts) of a
  // tile, and column tid + DEC_THREADS too where hd > DEC_THREADS.
  int parts = hd <= DEC_THREADS ? DEC_THREADS / hd : 1;
  int col = hd <= DEC_THREADS ? tid % hd : tid, part = hd <= DEC_THREADS ? tid / hd : 0;
  bool active = part < parts && col < hd, second = col + DEC_THREADS < hd;
  float acc0 = 0.0f, acc1 = 0.0f, m = -INFINITY, l = 0.0f;
  // This split's keys: whole tiles, the splits' runs as even as tiles allow.
  int total = len + 1;
  int chunk = ((total + splits - 1) / splits + DEC_THREADS - 1) / DEC_THREADS * DEC_THREADS;
  int first = split * chunk, end = min(total, first + chunk);
  __syncthreads();
  for (int j0 = first; j0 < end; j0 += DEC_THREADS) {
    int tile = min(DEC_THREADS, end - j0);
    for (int jj = warp; jj < tile; jj += DEC_THREADS / 32) {
      int j = j0 + jj;
      float s = 0.0f;
      if (j < len) {
        const T* kr = K + (int64_t)j * hd;
        for (int c = lane; c < hd; c += 32) s += qs[c] * dec_ld(kr + c);
      } else {
        for (int c = lane; c < hd; c += 32) s += qs[c] * kn[c];
      }
      for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) p[jj] = s;
    }
    __syncthreads();
    float sj = tid < tile ? p[tid] : -INFINITY;
    float mnew = fmaxf(m, dec_reduce(sj, red, true));
    float ej = tid < tile ? __expf(sj - mnew) : 0.0f;
    float f = __expf(m - mnew);
    l = l * f + dec_reduce(ej, red, false);
    m = mnew;
    acc0 *= f;
    acc1 *= f;
    p[tid] = ej;
    __syncthreads();
    if (active)
      for (int jj = part; jj < tile; jj += parts) {
        int j = j0 + jj;
        const T* vr = j < len ? V + (int64_t)j * hd : vn;
        acc0 += p[jj] * dec_ld(vr + col);
        if (second) acc1 += p[jj] * dec_ld(vr + col + DEC_THREADS);
      }
    __syncthreads();
  }
  if (parts > 1) {
    if (active) parts_acc[tid] = acc0;
    __syncthreads();
    if (active && part == 0)
      for (int r = 1; r < parts; r++) acc0 += parts_acc[r * hd + col];
  }
  if (splits > 1) {
    // Running max, sum and the unnormalised output; a split without keys leaves −∞, 0 and 0.
    float* pp = partial + (((int64_t)i * heads + h) * splits + split) * (2 + hd);
    if (tid == 0) {
      pp[0] = m;
      pp[1] = l;
    }
    if (active && part == 0) {
      pp[2 + col] = acc0;
      if (second) pp[2 + col + DEC_THREADS] = acc1;
    }
    return;
  }
  T* o = out + ((int64_t)i * heads + h) * hd;
  if (active && part == 0) {
    dec_st(o + col, acc0 / l);
    if (second) dec_st(o + col + DEC_THREADS, acc1 / l);
  }
}

#define DECODE_ATTENTION(NAME, T)                                                                \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS)                                      \
      NAME(T* out, float* partial, const T* q, const T* k_new, const T* v_new,                   \
           const uint64_t* table, const float* rope, int n, int splits, int heads, int kv_heads, \
           int hd, int rotated, int q_hs, int q_ss, int k_hs, int k_ss, int v_hs, int v_ss,      \
           float scale) {                                                                        \
    decode_attention_t(out, partial, q, k_new, v_new, table, rope, n, splits, heads, kv_heads,   \
                       hd, rotated, q_hs, q_ss, k_hs, k_ss, v_hs, v_ss, scale);                  \
  }
DECODE_ATTENTION(decode_attention, float)
DECODE_ATTENTION(decode_attention_bf16, uint16_t)

// The splits of decode_attention merged: out = Σ_s e^(m_s − M)·acc_s / Σ_s e^(m_s − M)·l_s with
// M the largest m_s. A block of DEC_THREADS per (sequence, query head), threads over columns.
template <class T>
__device__ __forceinline__ void decode_combine_t(T* out, const float* partial, int n, int splits,
                                                 int heads, int hd) {
  int i = blockIdx.x, h = blockIdx.y;
  if (i >= n || h >= heads) return;
  const float* pp = partial + ((int64_t)i * heads + h) * splits * (2 + hd);
  float mx = -INFINITY, l = 0.0f;
  for (int s = 0; s < splits; s++) mx = fmaxf(mx, pp[s * (2 + hd)]);
  for (int s = 0; s < splits; s++) l += pp[s * (2 + hd) + 1] * __expf(pp[s * (2 + hd)] - mx);
  T* o = out + ((int64_t)i * heads + h) * hd;
  for (int c = threadIdx.x; c < hd; c += DEC_THREADS) {
    float acc = 0.0f;
    for (int s = 0; s < splits; s++)
      acc += pp[s * (2 + hd) + 2 + c] * __expf(pp[s * (2 + hd)] - mx);
    dec_st(o + c, acc / l);
  }
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    decode_combine(float* out, const float* partial, int n, int splits, int heads, int hd) {
  decode_combine_t(out, partial, n, splits, heads, hd);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    decode_combine_bf16(uint16_t* out, const float* partial, int n, int splits, int heads, int hd) {
  decode_combine_t(out, partial, n, splits, heads, hd);
}

// Prompt pieces of sequences that each continue their own KV cache (a serving round that reads
// prompts beside decoding steps, or one prompt read into a cache): cache_append writes every
// new key (rotated) and value into its sequence's cache, then extend_attention lets each new
// row attend to its cache's positions up to its own (all of them in the cache by then).
// tiles[6i .. 6i + 6] describe tile i: up to EXT_ROWS consecutive new rows of one sequence —
// its cache's key and value addresses, the position of the tile's first row, the tile's rows,
// the index of its first row among the n new rows (q's, k_new's and v_new's sequence axis and
// out's rows), and the elements between the cache's heads. Rotation and strides as for
// decode_attention.
#define EXT_ROWS 16
#define EXT_KEYS 16

template <class T>
__device__ __forceinline__ T* ext_cache(uint64_t addr, int64_t head_stride, int g) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(addr)) + g * head_stride;
}

// x[c] of a row whose first `rotated` columns turn at table row `row` (rotate-half pairs).
template <class T>
__device__ __forceinline__ float ext_rotated(const T* x, int c, const float* row, int rotated) {
  if (!row || c >= rotated) return dec_ld(x + c);
  int half = rotated / 2, cc = c % half;
  float cs = row[cc], sn = row[half + cc];
  return c < half ? dec_ld(x + c) * cs - dec_ld(x + c + half) * sn
                  : dec_ld(x + c) * cs + dec_ld(x + c - half) * sn;
}

// A block of DEC_THREADS per (tile, key/value head): the tile's keys and values into the cache.
template <class T>
__device__ __forceinline__ void cache_append_t(const T* k_new, const T* v_new,
                                               const uint64_t* tiles, const float* rope,
                                               int n_tiles, int kv_heads, int hd, int rotated,
                                               int k_hs, int k_ss, int v_hs, int v_ss) {
  int ti = blockIdx.x, g = blockIdx.y;
  if (ti >= n_tiles || g >= kv_heads) return;
  const uint64_t* e = tiles + 6 * (int64_t)ti;
  int64_t head_stride = (int64_t)e[5];
  T* K = ext_cache<T>(e[0], head_stride, g);
  T* V = ext_cache<T>(e[1], head_stride, g);
  int pos0 = (int)e[2], rows = (int)e[3], first = (int)e[4];
  for (int r = 0; r < rows; r++) {
    int64_t pos = pos0 + r, i = first + r;
    const T* kr = k_new + (int64_t)g * k_hs + i * k_ss;
    const T* vr = v_new + (int64_t)g * v_hs + i * v_ss;
    const float* row = rope ? rope + pos * rotated : nullptr;
    for (int c = threadIdx.x; c < hd; c += DEC_THREADS) {
      dec_st(K + pos * hd + c, ext_rotated(kr, c, row, rotated));
      V[pos * hd + c] = vr[c];
    }
  }
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    cache_append(const float* k_new, const float* v_new, const uint64_t* tiles, const float* rope,
                 int n_tiles, int kv_heads, int hd, int rotated, int k_hs, int k_ss, int v_hs,
                 int v_ss) {
  cache_append_t(k_new, v_new, tiles, rope, n_tiles, kv_heads, hd, rotated, k_hs, k_ss, v_hs,
                 v_ss);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    cache_append_bf16(const uint16_t* k_new, const uint16_t* v_new, const uint64_t* tiles,
                      const float* rope, int n_tiles, int kv_heads, int hd, int rotated, int k_hs,
                      int k_ss, int v_hs, int v_ss) {
  cache_append_t(k_new, v_new, tiles, rope, n_tiles, kv_heads, hd, rotated, k_hs, k_ss, v_hs,
                 v_ss);
}

// A block of DEC_THREADS per (tile, query head): the tile's queries (rotated, scaled) in shared
// memory, the keys EXT_KEYS at a time (every key up to the tile's last row's position), causal
// within the tile, online softmax per row. Scores: a thread per (row, key) pair, a dot product
// over rows of shared memory padded to hd + 1 (the 16 keys a warp reads fall in different
// banks). Values: 8 threads per row (DEC_THREADS = EXT_ROWS · 8), thread c % 8 adding columns
// c, c + 8, ... in registers; each of them takes 2 of the tile's keys in the softmax.
template <class T>
__device__ __forceinline__ void extend_attention_t(T* out, const T* q, const uint64_t* tiles,
                                                   const float* rope, int n_tiles, int heads,
                                                   int kv_heads, int hd, int rotated, int q_hs,
                                                   int q_ss, float scale) {
  __shared__ float qs[EXT_ROWS * (DEC_MAX_HD + 1)];
  __shared__ float kv[EXT_KEYS * (DEC_MAX_HD + 1)];
  __shared__ float s[EXT_ROWS][EXT_KEYS + 1];
  int ti = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  if (ti >= n_tiles || h >= heads) return;
  int g = h / (heads / kv_heads), ld = hd + 1;
  const uint64_t* e = tiles + 6 * (int64_t)ti;
  int64_t head_stride = (int64_t)e[5];
  const T* K = ext_cache<T>(e[0], head_stride, g);
  const T* V = ext_cache<T>(e[1], head_stride, g);
  int pos0 = (int)e[2], rows = (int)e[3], first = (int)e[4];
  for (int x = tid; x < rows * hd; x += DEC_THREADS) {
    int r = x / hd, c = x % hd;
    const T* qr = q + (int64_t)h * q_hs + (int64_t)(first + r) * q_ss;
    const float* row = rope ? rope + (int64_t)(pos0 + r) * rotated : nullptr;
    qs[r * ld + c] = ext_rotated(qr, c, row, rotated) * scale;
  }
  int r = tid / 8, lane8 = tid % 8;
  bool live = r < rows;
  float acc[DEC_MAX_HD / 8];
#pragma unroll
  for (int u = 0; u < DEC_MAX_HD / 8; u++) acc[u] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  int total = pos0 + rows;
  for (int j0 = 0; j0 < total; j0 += EXT_KEYS) {
    int tile = min(EXT_KEYS, total - j0);
    __syncthreads();  // the last tile's values and weights read
    for (int x = tid; x < tile * hd; x += DEC_THREADS) {
      int j = x / hd, c = x % hd;
      kv[j * ld + c] = dec_ld(K + (int64_t)(j0 + j) * hd + c);
    }
    __syncthreads();
    for (int p = tid; p < rows * EXT_KEYS; p += DEC_THREADS) {
      int qi = p / EXT_KEYS, kj = p % EXT_KEYS;
      float dot = -INFINITY;
      if (kj < tile && j0 + kj <= pos0 + qi) {
        dot = 0.0f;
        for (int c = 0; c < hd; c++) dot += qs[qi * ld + c] * kv[kj * ld + c];
      }
      s[qi][kj] = dot;
    }
    __syncthreads();  // the scores written, the keys read
    for (int x = tid; x < tile * hd; x += DEC_THREADS) {
      int j = x / hd, c = x % hd;
      kv[j * ld + c] = dec_ld(V + (int64_t)(j0 + j) * hd + c);
    }
    float a = live ? s[r][lane8] : -INFINITY, b = live ? s[r][lane8 + 8] : -INFINITY;
    float mx = fmaxf(a, b);
    for (int o = 4; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    // Every row sees key 0 in the first tile, so mnew is finite for the rows that count.
    float mnew = fmaxf(m, mx);
    float ea = live ? __expf(a - mnew) : 0.0f, eb = live ? __expf(b - mnew) : 0.0f;
    float sum = ea + eb;
    for (int o = 4; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    float f = live ? __expf(m - mnew) : 0.0f;
    l = l * f + sum;
    m = mnew;
    if (live) {
      s[r][lane8] = ea;
      s[r][lane8 + 8] = eb;
    }
    __syncthreads();  // the values and weights in place
    if (live) {
#pragma unroll
      for (int u = 0; u < DEC_MAX_HD / 8; u++) acc[u] *= f;
      for (int kj = 0; kj < tile; kj++) {
        float w = s[r][kj];
        const float* vr = kv + kj * ld + lane8;
#pragma unroll
        for (int u = 0; u < DEC_MAX_HD / 8; u++)
          if (lane8 + 8 * u < hd) acc[u] += w * vr[8 * u];
      }
    }
  }
  if (!live) return;
  T* o = out + ((int64_t)(first + r) * heads + h) * hd;
#pragma unroll
  for (int u = 0; u < DEC_MAX_HD / 8; u++)
    if (lane8 + 8 * u < hd) dec_st(o + lane8 + 8 * u, acc[u] / l);
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    extend_attention(float* out, const float* q, const uint64_t* tiles, const float* rope,
                     int n_tiles, int heads, int kv_heads, int hd, int rotated, int q_hs,
                     int q_ss, float scale) {
  extend_attention_t(out, q, tiles, rope, n_tiles, heads, kv_heads, hd, rotated, q_hs, q_ss,
                     scale);
}
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    extend_attention_bf16(uint16_t* out, const uint16_t* q, const uint64_t* tiles,
                          const float* rope, int n_tiles, int heads, int kv_heads, int hd,
                          int rotated, int q_hs, int q_ss, float scale) {
  extend_attention_t(out, q, tiles, rope, n_tiles, heads, kv_heads, hd, rotated, q_hs, q_ss,
                     scale);
}
