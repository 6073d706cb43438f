// Flash-style causal attention on the tensor cores: TF32 products with f32 accumulation, the
// softmax in f32. The forward pass keeps one log-sum-exp per query row instead of the [t, t]
// probabilities; the backward pass recomputes the probabilities a tile at a time (one kernel for
// dQ over the keys, one for dK and dV over the queries: no atomics, the same result every run).
// Grouped-query attention: query head h reads key/value head h / (heads / kv_heads).
//
// Operands are row-major [b·t, ld] matrices, each with its own leading dimension `ld`; head h's
// HD columns start at h·HD (key/value heads at kvh·HD), so GPT-2's packed q|k|v [b·t, 3c] is read
// in place (q at column 0, k at c, v at 2c; ld = 3c). lse and the row dots d are [b, heads, t].
//
// A block of 4 warps owns 64 rows (16 per warp); tiles live in dynamic shared memory, their rows
// padded by 4 floats. Every warp reads only its own 16 rows of the tiles it owns, so warps meet
// at __syncthreads only when a shared tile of the other side (keys, or queries) is replaced.

#ifdef __CUDACC__
#include <mma.h>
#define LMKIT_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include <stdint.h>

#define ATT_LOG2E 1.4426950408889634f
#define ATT_ROWS 64  // rows a block owns
#define ATT_THREADS 128
#define ATT_PAD 4

// d[b, h, i] = Σ dO[i, h] ⊙ O[i, h] over the head's HD columns: a warp per (row, head).
extern "C" __global__ void attn_row_dots(float* d, const float* dout, const float* out, int n,
                                         int t, int heads, int hd, int ldd, int ldo) {
  int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (w >= (int64_t)n * heads) return;
  int r = w / heads, h = w % heads;
  const float* a = dout + (int64_t)r * ldd + h * hd;
  const float* b = out + (int64_t)r * ldo + h * hd;
  float s = 0.0f;
  for (int j = lane; j < hd; j += 32) s += a[j] * b[j];
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) d[((int64_t)(r / t) * heads + h) * t + r % t] = s;
}

// The tensor-core kernels need TF32 (compute capability 8.0 on); for older targets the module
// holds only the row dots, and the flash kernels are not used there (cuda.rs checks).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

using namespace nvcuda;

typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> FragBt;
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> FragC;

__device__ __forceinline__ float tf32(float x) { return wmma::__float_to_tf32(x); }

// acc[j] += A · Bᵀ for the 16 rows of A ([16, K] at a, row stride lda) and the N rows of B
// ([N, K] at b, row stride ldb): column block j of the [16, N] result in acc[j].
template <int K, int N>
__device__ __forceinline__ void mma_abt(FragC* acc, const float* a, int lda, const float* b,
                                        int ldb) {
#pragma unroll
  for (int k = 0; k < K; k += 8) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
    for (int j = 0; j < N / 16; j++) {
      FragBt fb;
      wmma::load_matrix_sync(fb, b + j * 16 * ldb + k, ldb);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}

// acc[j] += A · B for A [16, K] at a and B [K, N] at b (row-major).
template <int K, int N>
__device__ __forceinline__ void mma_ab(FragC* acc, const float* a, int lda, const float* b,
                                       int ldb) {
#pragma unroll
  for (int k = 0; k < K; k += 8) {
    FragA fa;
    wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
    for (int j = 0; j < N / 16; j++) {
      FragB fb;
      wmma::load_matrix_sync(fb, b + k * ldb + j * 16, ldb);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(FragC* acc) {
#pragma unroll
  for (int j = 0; j < N / 16; j++) wmma::fill_fragment(acc[j], 0.0f);
}

// Stores the [16, N] result (times `scale`) at out (row stride ld).
template <int N>
__device__ __forceinline__ void store(float* out, int ld, FragC* acc, float scale) {
#pragma unroll
  for (int j = 0; j < N / 16; j++) {
    for (int e = 0; e < acc[j].num_elements; e++) acc[j].x[e] *= scale;
    wmma::store_matrix_sync(out + j * 16, acc[j], ld, wmma::mem_row_major);
  }
}

// rows × HD of a [b·t, ld] operand from row `r0` of sequence `bi` into a shared tile (row stride
// HD + pad), rounded to TF32; rows at or past t become zeros.
template <int HD>
__device__ __forceinline__ void load_tile(float* tile, int rows, const float* src, int64_t ld,
                                          int r0, int t) {
  for (int i = threadIdx.x; i < rows * HD; i += ATT_THREADS) {
    int r = i / HD, d = i % HD;
    tile[r * (HD + ATT_PAD) + d] = r0 + r < t ? tf32(src[(int64_t)(r0 + r) * ld + d]) : 0.0f;
  }
}

// Rows of out (the first `rows` valid: < t) from a warp's staged [16, HD] tile.
template <int HD>
__device__ __forceinline__ void write_rows(float* dst, int64_t ld, const float* tile, int r0,
                                           int t) {
  int lane = threadIdx.x % 32;
  for (int i = lane; i < 16 * HD; i += 32) {
    int r = i / HD, d = i % HD;
    if (r0 + r < t) dst[(int64_t)(r0 + r) * ld + d] = tile[r * (HD + ATT_PAD) + d];
  }
}

// Forward: o = softmax(scale · q·kᵀ, causal) · v for each head; lse[b, h, i] = the natural
// log-sum-exp of row i's scaled scores. Grid (⌈t/64⌉, b·heads), 128 threads.
template <int HD, int BC>
__device__ void flash_fwd(const float* q, const float* k, const float* v, float* o, float* lse,
                          int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldo,
                          float scale) {
  constexpr int LDH = HD + ATT_PAD, LDS = BC + ATT_PAD;
  LMKIT_DYNAMIC_SHARED(smem);
  float* sQ = reinterpret_cast<float*>(smem);  // [64, LDH]
  float* sO = sQ + ATT_ROWS * LDH;              // [64, LDH]
  float* sK = sO + ATT_ROWS * LDH;              // [BC, LDH]
  float* sV = sK + BC * LDH;                    // [BC, LDH]
  float* sS = sV + BC * LDH;                    // [64, LDS]
  int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;  // the longest rows first
  int bi = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* qg = q + (int64_t)bi * t * ldq + h * HD;
  const float* kg = k + (int64_t)bi * t * ldk + kvh * HD;
  const float* vg = v + (int64_t)bi * t * ldv + kvh * HD;
  load_tile<HD>(sQ, ATT_ROWS, qg, ldq, q0, t);
  for (int i = threadIdx.x; i < ATT_ROWS * LDH; i += ATT_THREADS) sO[i] = 0.0f;
  // Each lane owns half a row of its warp's 16: the online softmax's running max m (in log2
  // units of the scaled scores) and sum l.
  int row = warp * 16 + lane / 2, half = lane % 2, qi = q0 + row;
  float m = -INFINITY, l = 0.0f;
  const float sl = scale * ATT_LOG2E;
  float* sw = sS + warp * 16 * LDS;
  float* ow = sO + warp * 16 * LDH;
  int kend = min(t, q0 + ATT_ROWS);
  for (int k0 = 0; k0 < kend; k0 += BC) {
    __syncthreads();
    load_tile<HD>(sK, BC, kg, ldk, k0, t);
    load_tile<HD>(sV, BC, vg, ldv, k0, t);
    __syncthreads();
    FragC acc[BC / 16];
    zero<BC>(acc);
    mma_abt<HD, BC>(acc, sQ + warp * 16 * LDH, LDH, sK, LDH);
    store<BC>(sw, LDS, acc, 1.0f);
    __syncwarp();
    float* sr = sS + row * LDS;
    float mx = -INFINITY;
    for (int c = half * (BC / 2); c < (half + 1) * (BC / 2); c++) {
      int kj = k0 + c;
      float s = kj <= qi && kj < t ? sr[c] * sl : -INFINITY;
      sr[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    float mn = fmaxf(m, mx);
    float base = mn == -INFINITY ? 0.0f : mn;  // rows with nothing yet (past t) stay 0
    float alpha = exp2f(m - base), sum = 0.0f;
    for (int c = half * (BC / 2); c < (half + 1) * (BC / 2); c++) {
      float p = exp2f(sr[c] - base);
      sum += p;
      sr[c] = tf32(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = mn;
    float* orow = sO + row * LDH;
    for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); d++) orow[d] *= alpha;
    __syncwarp();
    FragC oacc[HD / 16];
#pragma unroll
    for (int j = 0; j < HD / 16; j++)
      wmma::load_matrix_sync(oacc[j], ow + j * 16, LDH, wmma::mem_row_major);
    mma_ab<BC, HD>(oacc, sw, LDS, sV, LDH);
    store<HD>(ow, LDH, oacc, 1.0f);
    __syncwarp();
  }
  float inv = l > 0.0f ? 1.0f / l : 0.0f;
  float* orow = sO + row * LDH;
  for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); d++) orow[d] *= inv;
  if (qi < t && half == 0) lse[(int64_t)blockIdx.y * t + qi] = (m + log2f(l)) / ATT_LOG2E;
  __syncwarp();
  write_rows<HD>(o + (int64_t)bi * t * ldo + h * HD, ldo, ow, q0 + warp * 16, t);
}

// dQ = scale · dS·K with dS = P ⊙ (dP − d), dP = dO·Vᵀ, P = exp(scale·q·kᵀ − lse), over the key
// tiles up to the block's last row. Grid (⌈t/64⌉, b·heads), 128 threads.
template <int HD, int BC>
__device__ void flash_bwd_dq(const float* q, const float* k, const float* v, const float* dout,
                             const float* lse, const float* dvec, float* dq, int t, int heads,
                             int kv_heads, int ldq, int ldk, int ldv, int ldd, int lddq,
                             float scale) {
  constexpr int LDH = HD + ATT_PAD, LDS = BC + ATT_PAD;
  LMKIT_DYNAMIC_SHARED(smem);
  float* sQ = reinterpret_cast<float*>(smem);  // [64, LDH]; at the end, dQ
  float* sG = sQ + ATT_ROWS * LDH;              // dO [64, LDH]
  float* sK = sG + ATT_ROWS * LDH;              // [BC, LDH]
  float* sV = sK + BC * LDH;                    // [BC, LDH]
  float* sS = sV + BC * LDH;                    // S, then dS [64, LDS]
  float* sP = sS + ATT_ROWS * LDS;              // dP [64, LDS]
  int q0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;
  int bi = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* kg = k + (int64_t)bi * t * ldk + kvh * HD;
  const float* vg = v + (int64_t)bi * t * ldv + kvh * HD;
  load_tile<HD>(sQ, ATT_ROWS, q + (int64_t)bi * t * ldq + h * HD, ldq, q0, t);
  load_tile<HD>(sG, ATT_ROWS, dout + (int64_t)bi * t * ldd + h * HD, ldd, q0, t);
  int row = warp * 16 + lane / 2, half = lane % 2, qi = q0 + row;
  int64_t stat = (int64_t)blockIdx.y * t + qi;
  float lrow = qi < t ? lse[stat] * ATT_LOG2E : 0.0f, drow = qi < t ? dvec[stat] : 0.0f;
  const float sl = scale * ATT_LOG2E;
  float* sw = sS + warp * 16 * LDS;
  float* pw = sP + warp * 16 * LDS;
  FragC dacc[HD / 16];
  zero<HD>(dacc);
  int kend = min(t, q0 + ATT_ROWS);
  for (int k0 = 0; k0 < kend; k0 += BC) {
    __syncthreads();
    load_tile<HD>(sK, BC, kg, ldk, k0, t);
    load_tile<HD>(sV, BC, vg, ldv, k0, t);
    __syncthreads();
    FragC acc[BC / 16];
    zero<BC>(acc);
    mma_abt<HD, BC>(acc, sQ + warp * 16 * LDH, LDH, sK, LDH);
    store<BC>(sw, LDS, acc, 1.0f);
    zero<BC>(acc);
    mma_abt<HD, BC>(acc, sG + warp * 16 * LDH, LDH, sV, LDH);
    store<BC>(pw, LDS, acc, 1.0f);
    __syncwarp();
    float* sr = sS + row * LDS;
    const float* pr = sP + row * LDS;
    for (int c = half * (BC / 2); c < (half + 1) * (BC / 2); c++) {
      int kj = k0 + c;
      float p = kj <= qi && kj < t && qi < t ? exp2f(sr[c] * sl - lrow) : 0.0f;
      sr[c] = tf32(p * (pr[c] - drow));
    }
    __syncwarp();
    mma_ab<BC, HD>(dacc, sw, LDS, sK, LDH);
  }
  float* stage = sQ + warp * 16 * LDH;  // the warp's own Q rows, no longer read
  __syncwarp();
  store<HD>(stage, LDH, dacc, scale);
  write_rows<HD>(dq + (int64_t)bi * t * lddq + h * HD, lddq, stage, q0 + warp * 16, t);
}

// dV = Σ_h Pᵀ·dO and dK = scale · Σ_h dSᵀ·Q over the query heads h of key/value head kvh and
// the query tiles from the block's first key on. Grid (⌈t/64⌉, b·kv_heads), 128 threads.
template <int HD, int BQ>
__device__ void flash_bwd_dkdv(const float* q, const float* k, const float* v, const float* dout,
                               const float* lse, const float* dvec, float* dk, float* dv, int t,
                               int heads, int kv_heads, int ldq, int ldk, int ldv, int ldd,
                               int lddk, int lddv, float scale) {
  constexpr int LDH = HD + ATT_PAD, LDS = BQ + ATT_PAD;
  LMKIT_DYNAMIC_SHARED(smem);
  float* sK = reinterpret_cast<float*>(smem);  // [64, LDH]; at the end, dK
  float* sV = sK + ATT_ROWS * LDH;              // [64, LDH]; at the end, dV
  float* sQ = sV + ATT_ROWS * LDH;              // [BQ, LDH]
  float* sG = sQ + BQ * LDH;                    // dO [BQ, LDH]
  float* sS = sG + BQ * LDH;                    // Sᵀ, then Pᵀ [64, LDS]
  float* sP = sS + ATT_ROWS * LDS;              // dPᵀ, then dSᵀ [64, LDS]
  float* sL = sP + ATT_ROWS * LDS;              // the query tile's lse (log2 units) [BQ]
  float* sD = sL + BQ;                          // and row dots [BQ]
  int k0 = blockIdx.x * ATT_ROWS;  // the first keys have the most queries: launched first
  int bi = blockIdx.y / kv_heads, kvh = blockIdx.y % kv_heads, group = heads / kv_heads;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile<HD>(sK, ATT_ROWS, k + (int64_t)bi * t * ldk + kvh * HD, ldk, k0, t);
  load_tile<HD>(sV, ATT_ROWS, v + (int64_t)bi * t * ldv + kvh * HD, ldv, k0, t);
  int row = warp * 16 + lane / 2, half = lane % 2, kj = k0 + row;
  const float sl = scale * ATT_LOG2E;
  float* sw = sS + warp * 16 * LDS;
  float* pw = sP + warp * 16 * LDS;
  FragC kacc[HD / 16], vacc[HD / 16];
  zero<HD>(kacc);
  zero<HD>(vacc);
  for (int g = 0; g < group; g++) {
    int h = kvh * group + g;
    const float* qg = q + (int64_t)bi * t * ldq + h * HD;
    const float* gg = dout + (int64_t)bi * t * ldd + h * HD;
    const float* lg = lse + ((int64_t)bi * heads + h) * t;
    const float* dg = dvec + ((int64_t)bi * heads + h) * t;
    for (int q0 = k0 / BQ * BQ; q0 < t; q0 += BQ) {
      __syncthreads();
      load_tile<HD>(sQ, BQ, qg, ldq, q0, t);
      load_tile<HD>(sG, BQ, gg, ldd, q0, t);
      for (int i = threadIdx.x; i < BQ; i += ATT_THREADS) {
        sL[i] = q0 + i < t ? lg[q0 + i] * ATT_LOG2E : 0.0f;
        sD[i] = q0 + i < t ? dg[q0 + i] : 0.0f;
      }
      __syncthreads();
      FragC acc[BQ / 16];
      zero<BQ>(acc);
      mma_abt<HD, BQ>(acc, sK + warp * 16 * LDH, LDH, sQ, LDH);
      store<BQ>(sw, LDS, acc, 1.0f);
      zero<BQ>(acc);
      mma_abt<HD, BQ>(acc, sV + warp * 16 * LDH, LDH, sG, LDH);
      store<BQ>(pw, LDS, acc, 1.0f);
      __syncwarp();
      float* sr = sS + row * LDS;
      float* pr = sP + row * LDS;
      for (int c = half * (BQ / 2); c < (half + 1) * (BQ / 2); c++) {
        int qi = q0 + c;
        float p = kj <= qi && qi < t && kj < t ? exp2f(sr[c] * sl - sL[c]) : 0.0f;
        sr[c] = tf32(p);
        pr[c] = tf32(p * (pr[c] - sD[c]));
      }
      __syncwarp();
      mma_ab<BQ, HD>(vacc, sw, LDS, sG, LDH);
      mma_ab<BQ, HD>(kacc, pw, LDS, sQ, LDH);
    }
  }
  float* kst = sK + warp * 16 * LDH;  // the warp's own key rows, no longer read
  float* vst = sV + warp * 16 * LDH;
  __syncwarp();
  store<HD>(kst, LDH, kacc, scale);
  store<HD>(vst, LDH, vacc, 1.0f);
  write_rows<HD>(dk + (int64_t)bi * t * lddk + kvh * HD, lddk, kst, k0 + warp * 16, t);
  write_rows<HD>(dv + (int64_t)bi * t * lddv + kvh * HD, lddv, vst, k0 + warp * 16, t);
}

// The kernels for head sizes 32, 64 and 128 (tiles of 64 keys/queries; 32 for head size 128 to
// keep the shared memory within 128 KiB).
#define ATT_KERNELS(HD, BC)                                                                      \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                      \
      flash_fwd_##HD(const float* q, const float* k, const float* v, float* o, float* lse,       \
                     int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldo,         \
                     float scale) {                                                              \
    flash_fwd<HD, BC>(q, k, v, o, lse, t, heads, kv_heads, ldq, ldk, ldv, ldo, scale);          \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dq_##HD(                   \
      const float* q, const float* k, const float* v, const float* dout, const float* lse,       \
      const float* dvec, float* dq, int t, int heads, int kv_heads, int ldq, int ldk, int ldv,   \
      int ldd, int lddq, float scale) {                                                          \
    flash_bwd_dq<HD, BC>(q, k, v, dout, lse, dvec, dq, t, heads, kv_heads, ldq, ldk, ldv, ldd,  \
                         lddq, scale);                                                           \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) flash_bwd_dkdv_##HD(                 \
      const float* q, const float* k, const float* v, const float* dout, const float* lse,       \
      const float* dvec, float* dk, float* dv, int t, int heads, int kv_heads, int ldq, int ldk, \
      int ldv, int ldd, int lddk, int lddv, float scale) {                                       \
    flash_bwd_dkdv<HD, BC>(q, k, v, dout, lse, dvec, dk, dv, t, heads, kv_heads, ldq, ldk, ldv, \
                           ldd, lddk, lddv, scale);                                              \
  }

ATT_KERNELS(32, 64)
ATT_KERNELS(64, 64)
ATT_KERNELS(128, 32)

#endif
