// Flash-style causal attention with bf16 operands (for `train.dtype = "bf16"`): the same
// algorithm, operands and layouts as attention.cu (see there), but the products run as
// register-resident mma.sync m16n8k16 tiles: bf16 inputs, f32 accumulators that stay in
// registers, the softmax on the accumulators themselves, and the probabilities (or dS) turned
// into the next product's operand without a trip through shared memory. Shared memory holds the
// bf16 key/value (or query/output-gradient) tiles only.
//
// A block of 4 warps owns 64 rows, 16 per warp. In a warp, lane L holds row L/4 and row L/4 + 8
// of the warp's 16, and columns 2·(L%4) and 2·(L%4) + 1 of every 8 (the m16n8 accumulator
// layout of the PTX ISA); the row statistics are reduced over the 4 lanes that share a row.

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#define LMKIT_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]

// d += a·b on the tensor cores: the warp's a [16, 16] (4 registers of bf16 pairs per lane), b
// [16, 8] (2 registers), d [16, 8] f32 (4 per lane).
__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
#if __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// lo and hi rounded to bf16 (to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ void store_pair(uint16_t* p, uint32_t v) {
  *reinterpret_cast<uint32_t*>(p) = v;
}
#endif

#define B16_LOG2E 1.4426950408889634f
#define B16_ROWS 64  // rows a block owns
#define B16_THREADS 128
#define B16_PAD 8  // bf16 elements after each tile row

// rows × HD of a [b·t, ld] f32 operand from row r0 into a bf16 tile (row stride HD + pad); rows
// at or past t become zeros.
template <int HD>
__device__ __forceinline__ void load_tile16(uint16_t* tile, int rows, const float* src,
                                            int64_t ld, int r0, int t) {
  for (int i = threadIdx.x; i < rows * (HD / 2); i += B16_THREADS) {
    int r = i / (HD / 2), d = i % (HD / 2) * 2;
    float x0 = 0.0f, x1 = 0.0f;
    if (r0 + r < t) {
      const float* p = src + (int64_t)(r0 + r) * ld + d;
      x0 = p[0];
      x1 = p[1];
    }
    store_pair(tile + r * (HD + B16_PAD) + d, pack_bf16x2(x0, x1));
  }
}

// The A fragment of rows r0..r0+15, columns c0..c0+15 of a bf16 tile.
__device__ __forceinline__ void frag_a(uint32_t* a, const uint16_t* tile, int ld, int r0,
                                       int c0) {
  int lane = threadIdx.x % 32;
  const uint16_t* p = tile + (r0 + lane / 4) * ld + c0 + lane % 4 * 2;
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * ld);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * ld + 8);
}

// The B fragment of B[k][n] = X[n0 + n][k0 + k] (B is a tile's transpose: k runs along X's rows).
__device__ __forceinline__ void frag_bt(uint32_t* b, const uint16_t* x, int ld, int n0, int k0) {
  int lane = threadIdx.x % 32;
  const uint16_t* p = x + (n0 + lane / 4) * ld + k0 + lane % 4 * 2;
  b[0] = load_pair(p);
  b[1] = load_pair(p + 8);
}

// The B fragment of B[k][n] = X[k0 + k][n0 + n].
__device__ __forceinline__ void frag_b(uint32_t* b, const uint16_t* x, int ld, int k0, int n0) {
  int lane = threadIdx.x % 32;
  const uint16_t* p = x + (k0 + lane % 4 * 2) * ld + n0 + lane / 4;
  b[0] = (uint32_t)p[0] | (uint32_t)p[ld] << 16;
  b[1] = (uint32_t)p[8 * ld] | (uint32_t)p[9 * ld] << 16;
}

// The A fragment of columns 16·kk..16·kk+15 of a warp's [16, N] accumulators (acc[j]: columns
// 8j..8j+7), rounded to bf16: the accumulator and A layouts hold the same elements per lane.
__device__ __forceinline__ void frag_a_acc(uint32_t* a, const float (*acc)[4], int kk) {
  a[0] = pack_bf16x2(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack_bf16x2(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack_bf16x2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack_bf16x2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc[j] += A·Xᵀ over K columns: A = rows ar0..ar0+15 of tile a, X = the N rows of tile x.
template <int K, int N>
__device__ __forceinline__ void mma_abt16(float (*acc)[4], const uint16_t* a, int lda, int ar0,
                                          const uint16_t* x, int ldx) {
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    uint32_t fa[4];
    frag_a(fa, a, lda, ar0, kk);
#pragma unroll
    for (int j = 0; j < N / 8; j++) {
      uint32_t fb[2];
      frag_bt(fb, x, ldx, j * 8, kk);
      mma_bf16(acc[j], fa, fb);
    }
  }
}

// acc[j] += P·X: P = the warp's [16, K] accumulators p, X = the [K, N] tile x.
template <int K, int N>
__device__ __forceinline__ void mma_px16(float (*acc)[4], const float (*p)[4], const uint16_t* x,
                                         int ldx) {
#pragma unroll
  for (int kk = 0; kk < K / 16; kk++) {
    uint32_t fa[4];
    frag_a_acc(fa, p, kk);
#pragma unroll
    for (int j = 0; j < N / 8; j++) {
      uint32_t fb[2];
      frag_b(fb, x, ldx, kk * 16, j * 8);
      mma_bf16(acc[j], fa, fb);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero16(float (*acc)[4]) {
#pragma unroll
  for (int j = 0; j < N / 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
}

// The lane's two rows (r = 0, 1: rows lane/4 and lane/4 + 8 of the warp's 16) of [16, HD]
// accumulators times `scale` into rows row0 + ... of dst, those below t.
template <int HD>
__device__ __forceinline__ void write_rows16(float* dst, int64_t ld, const float (*acc)[4],
                                             int row0, int t, float scale) {
  int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int row = row0 + lane / 4 + 8 * r;
    if (row >= t) continue;
    float* out = dst + (int64_t)row * ld + lane % 4 * 2;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      out[8 * j] = acc[j][2 * r] * scale;
      out[8 * j + 1] = acc[j][2 * r + 1] * scale;
    }
  }
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

// Forward: o and lse as attention.cu's flash_fwd. Grid (⌈t/64⌉, b·heads), 128 threads.
template <int HD, int BC>
__device__ void flash16_fwd(const float* q, const float* k, const float* v, float* o, float* lse,
                            int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldo,
                            float scale) {
  constexpr int LD = HD + B16_PAD;
  LMKIT_DYNAMIC_SHARED(smem);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);  // [64, LD]
  uint16_t* sK = sQ + B16_ROWS * LD;                  // [BC, LD]
  uint16_t* sV = sK + BC * LD;                        // [BC, LD]
  int q0 = (gridDim.x - 1 - blockIdx.x) * B16_ROWS;  // the longest rows first
  int bi = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* kg = k + (int64_t)bi * t * ldk + kvh * HD;
  const float* vg = v + (int64_t)bi * t * ldv + kvh * HD;
  load_tile16<HD>(sQ, B16_ROWS, q + (int64_t)bi * t * ldq + h * HD, ldq, q0, t);
  int rows[2] = {q0 + warp * 16 + lane / 4, q0 + warp * 16 + lane / 4 + 8};
  // The online softmax's running max (log2 units of the scaled scores) and this lane's part
  // of the running sum, per row.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float acc[HD / 8][4];
  zero16<HD>(acc);
  const float sl = scale * B16_LOG2E;
  int kend = min(t, q0 + B16_ROWS);
  for (int k0 = 0; k0 < kend; k0 += BC) {
    __syncthreads();
    load_tile16<HD>(sK, BC, kg, ldk, k0, t);
    load_tile16<HD>(sV, BC, vg, ldv, k0, t);
    __syncthreads();
    float s[BC / 8][4];
    zero16<BC>(s);
    mma_abt16<HD, BC>(s, sQ, LD, warp * 16, sK, LD);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BC / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int kj = k0 + 8 * j + lane % 4 * 2 + (e & 1), r = e / 2;
        float x = kj <= rows[r] && kj < t ? s[j][e] * sl : -INFINITY;
        s[j][e] = x;
        mx[r] = fmaxf(mx[r], x);
      }
    float base[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      float mn = fmaxf(m[r], quad_max(mx[r]));
      base[r] = mn == -INFINITY ? 0.0f : mn;  // rows with nothing yet (past t) stay 0
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = mn;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < BC / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float p = exp2f(s[j][e] - base[e / 2]);
        s[j][e] = p;
        l[e / 2] += p;
      }
#pragma unroll
    for (int j = 0; j < HD / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[j][e] *= alpha[e / 2];
    mma_px16<BC, HD>(acc, s, sV, LD);
  }
  float* og = o + (int64_t)bi * t * ldo + h * HD;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] = quad_sum(l[r]);
    if (rows[r] < t && lane % 4 == 0)
      lse[(int64_t)blockIdx.y * t + rows[r]] = (m[r] + log2f(l[r])) / B16_LOG2E;
    float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      acc[j][2 * r] *= inv;
      acc[j][2 * r + 1] *= inv;
    }
  }
  write_rows16<HD>(og, ldo, acc, q0 + warp * 16, t, 1.0f);
}

// dQ as attention.cu's flash_bwd_dq. Grid (⌈t/64⌉, b·heads), 128 threads.
template <int HD, int BC>
__device__ void flash16_bwd_dq(const float* q, const float* k, const float* v, const float* dout,
                               const float* lse, const float* dvec, float* dq, int t, int heads,
                               int kv_heads, int ldq, int ldk, int ldv, int ldd, int lddq,
                               float scale) {
  constexpr int LD = HD + B16_PAD;
  LMKIT_DYNAMIC_SHARED(smem);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);  // [64, LD]
  uint16_t* sG = sQ + B16_ROWS * LD;                  // dO [64, LD]
  uint16_t* sK = sG + B16_ROWS * LD;                  // [BC, LD]
  uint16_t* sV = sK + BC * LD;                        // [BC, LD]
  int q0 = (gridDim.x - 1 - blockIdx.x) * B16_ROWS;
  int bi = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* kg = k + (int64_t)bi * t * ldk + kvh * HD;
  const float* vg = v + (int64_t)bi * t * ldv + kvh * HD;
  load_tile16<HD>(sQ, B16_ROWS, q + (int64_t)bi * t * ldq + h * HD, ldq, q0, t);
  load_tile16<HD>(sG, B16_ROWS, dout + (int64_t)bi * t * ldd + h * HD, ldd, q0, t);
  int rows[2] = {q0 + warp * 16 + lane / 4, q0 + warp * 16 + lane / 4 + 8};
  float lrow[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int64_t stat = (int64_t)blockIdx.y * t + rows[r];
    lrow[r] = rows[r] < t ? lse[stat] * B16_LOG2E : 0.0f;
    drow[r] = rows[r] < t ? dvec[stat] : 0.0f;
  }
  const float sl = scale * B16_LOG2E;
  float acc[HD / 8][4];
  zero16<HD>(acc);
  int kend = min(t, q0 + B16_ROWS);
  for (int k0 = 0; k0 < kend; k0 += BC) {
    __syncthreads();
    load_tile16<HD>(sK, BC, kg, ldk, k0, t);
    load_tile16<HD>(sV, BC, vg, ldv, k0, t);
    __syncthreads();
    float s[BC / 8][4], dp[BC / 8][4];
    zero16<BC>(s);
    zero16<BC>(dp);
    mma_abt16<HD, BC>(s, sQ, LD, warp * 16, sK, LD);
    mma_abt16<HD, BC>(dp, sG, LD, warp * 16, sV, LD);
#pragma unroll
    for (int j = 0; j < BC / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int kj = k0 + 8 * j + lane % 4 * 2 + (e & 1), r = e / 2;
        bool in = kj <= rows[r] && kj < t && rows[r] < t;
        float p = in ? exp2f(s[j][e] * sl - lrow[r]) : 0.0f;
        s[j][e] = p * (dp[j][e] - drow[r]);
      }
    mma_px16<BC, HD>(acc, s, sK, LD);
  }
  write_rows16<HD>(dq + (int64_t)bi * t * lddq + h * HD, lddq, acc, q0 + warp * 16, t, scale);
}

// dK and dV as attention.cu's flash_bwd_dkdv. Grid (⌈t/64⌉, b·kv_heads), 128 threads.
template <int HD, int BQ>
__device__ void flash16_bwd_dkdv(const float* q, const float* k, const float* v,
                                 const float* dout, const float* lse, const float* dvec, float* dk,
                                 float* dv, int t, int heads, int kv_heads, int ldq, int ldk,
                                 int ldv, int ldd, int lddk, int lddv, float scale) {
  constexpr int LD = HD + B16_PAD;
  LMKIT_DYNAMIC_SHARED(smem);
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);  // [64, LD]
  uint16_t* sV = sK + B16_ROWS * LD;                  // [64, LD]
  uint16_t* sQ = sV + B16_ROWS * LD;                  // [BQ, LD]
  uint16_t* sG = sQ + BQ * LD;                        // dO [BQ, LD]
  float* sL = reinterpret_cast<float*>(sG + BQ * LD);  // the query tile's lse (log2 units) [BQ]
  float* sD = sL + BQ;                                  // and row dots [BQ]
  int k0 = blockIdx.x * B16_ROWS;  // the first keys have the most queries: launched first
  int bi = blockIdx.y / kv_heads, kvh = blockIdx.y % kv_heads, group = heads / kv_heads;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile16<HD>(sK, B16_ROWS, k + (int64_t)bi * t * ldk + kvh * HD, ldk, k0, t);
  load_tile16<HD>(sV, B16_ROWS, v + (int64_t)bi * t * ldv + kvh * HD, ldv, k0, t);
  int keys[2] = {k0 + warp * 16 + lane / 4, k0 + warp * 16 + lane / 4 + 8};
  const float sl = scale * B16_LOG2E;
  float kacc[HD / 8][4], vacc[HD / 8][4];
  zero16<HD>(kacc);
  zero16<HD>(vacc);
  for (int member = 0; member < group; member++) {
    int h = kvh * group + member;
    const float* qg = q + (int64_t)bi * t * ldq + h * HD;
    const float* gg = dout + (int64_t)bi * t * ldd + h * HD;
    const float* lg = lse + ((int64_t)bi * heads + h) * t;
    const float* dg = dvec + ((int64_t)bi * heads + h) * t;
    for (int q0 = k0 / BQ * BQ; q0 < t; q0 += BQ) {
      __syncthreads();
      load_tile16<HD>(sQ, BQ, qg, ldq, q0, t);
      load_tile16<HD>(sG, BQ, gg, ldd, q0, t);
      for (int i = threadIdx.x; i < BQ; i += B16_THREADS) {
        sL[i] = q0 + i < t ? lg[q0 + i] * B16_LOG2E : 0.0f;
        sD[i] = q0 + i < t ? dg[q0 + i] : 0.0f;
      }
      __syncthreads();
      float st[BQ / 8][4], dpt[BQ / 8][4];
      zero16<BQ>(st);
      zero16<BQ>(dpt);
      mma_abt16<HD, BQ>(st, sK, LD, warp * 16, sQ, LD);
      mma_abt16<HD, BQ>(dpt, sV, LD, warp * 16, sG, LD);
#pragma unroll
      for (int j = 0; j < BQ / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int c = 8 * j + lane % 4 * 2 + (e & 1), qi = q0 + c, kj = keys[e / 2];
          float p = kj <= qi && qi < t && kj < t ? exp2f(st[j][e] * sl - sL[c]) : 0.0f;
          st[j][e] = p;
          dpt[j][e] = p * (dpt[j][e] - sD[c]);
        }
      mma_px16<BQ, HD>(vacc, st, sG, LD);
      mma_px16<BQ, HD>(kacc, dpt, sQ, LD);
    }
  }
  write_rows16<HD>(dk + (int64_t)bi * t * lddk + kvh * HD, lddk, kacc, k0 + warp * 16, t, scale);
  write_rows16<HD>(dv + (int64_t)bi * t * lddv + kvh * HD, lddv, vacc, k0 + warp * 16, t, 1.0f);
}

// The kernels for head sizes 32, 64 and 128: tiles of 64 keys (or queries); 32 queries for the
// dK/dV kernel of head size 128, whose two [16, 128] accumulators take 128 registers a thread.
#define B16_KERNELS(HD, BC, BQ)                                                                  \
  extern "C" __global__ void __launch_bounds__(B16_THREADS)                                      \
      flash_bf16_fwd_##HD(const float* q, const float* k, const float* v, float* o, float* lse,  \
                          int t, int heads, int kv_heads, int ldq, int ldk, int ldv, int ldo,    \
                          float scale) {                                                         \
    flash16_fwd<HD, BC>(q, k, v, o, lse, t, heads, kv_heads, ldq, ldk, ldv, ldo, scale);        \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(B16_THREADS) flash_bf16_bwd_dq_##HD(              \
      const float* q, const float* k, const float* v, const float* dout, const float* lse,       \
      const float* dvec, float* dq, int t, int heads, int kv_heads, int ldq, int ldk, int ldv,   \
      int ldd, int lddq, float scale) {                                                          \
    flash16_bwd_dq<HD, BC>(q, k, v, dout, lse, dvec, dq, t, heads, kv_heads, ldq, ldk, ldv, ldd, \
                           lddq, scale);                                                         \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(B16_THREADS) flash_bf16_bwd_dkdv_##HD(            \
      const float* q, const float* k, const float* v, const float* dout, const float* lse,       \
      const float* dvec, float* dk, float* dv, int t, int heads, int kv_heads, int ldq, int ldk, \
      int ldv, int ldd, int lddk, int lddv, float scale) {                                       \
    flash16_bwd_dkdv<HD, BQ>(q, k, v, dout, lse, dvec, dk, dv, t, heads, kv_heads, ldq, ldk,    \
                             ldv, ldd, lddk, lddv, scale);                                       \
  }

B16_KERNELS(32, 64, 64)
B16_KERNELS(64, 64, 64)
B16_KERNELS(128, 64, 32)
