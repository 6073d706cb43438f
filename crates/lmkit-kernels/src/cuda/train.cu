// CUDA kernels of the hand-written training passes (f32 activations and gradients; the matrix
// products are cuBLAS calls made from Rust). Each kernel mirrors a CPU kernel of fused.rs or
// blas.rs, and the GPU pass is checked against the CPU pass. With bf16 products the kernels whose
// output is only a product's operand (the norms, the activations) write it as bf16 (the `_bf16`
// kernels: their f32 value rounded to nearest, ties to even), and `to_bf16` rounds the others.
//
// Layouts are row-major: activations [rows, cols], packed attention q|k|v [rows, 3·c].

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
// v rounded to bf16 (to nearest, ties to even), as its 16 bits.
__device__ __forceinline__ uint16_t bf16_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
// The value of bf16 bits.
__device__ __forceinline__ float bf16_value(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
#else
inline uint16_t bf16_bits(float v) { return emu_bf16(v); }
inline float bf16_value(uint16_t b) { return emu_from_bf16(b); }
#endif

// An output element: f32, or bf16 bits.
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(uint16_t* p, float v) { *p = bf16_bits(v); }
// An input element: f32, or bf16 bits.
__device__ __forceinline__ float get(const float* p) { return *p; }
__device__ __forceinline__ float get(const uint16_t* p) { return bf16_value(*p); }

#define WARP 32

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum (or max) over a block of up to 1024 threads; every thread gets the result.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[wid] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// x[r] = wte[ids[r]] + wpe[r % t], one thread per element.
extern "C" __global__ void embed_fwd(float* x, const float* wte, const float* wpe,
                                     const uint32_t* ids, int n, int t, int c) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * c) return;
    int r = i / c, j = i % c;
    x[i] = wte[(int64_t)ids[r] * c + j] + wpe[(int64_t)(r % t) * c + j];
}

// Rows of dx into the embeddings' gradients: dwte[ids[r]] += dx[r] (atomic: one token id can
// occur in many rows), dwpe[p] = Σ_b dx[b·t + p] (no atomics; dwpe's rows past t stay 0).
extern "C" __global__ void embed_bwd_tokens(float* dwte, const float* dx, const uint32_t* ids,
                                            int n, int c) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * c) return;
    int r = i / c, j = i % c;
    atomicAdd(&dwte[(int64_t)ids[r] * c + j], dx[i]);
}

extern "C" __global__ void embed_bwd_positions(float* dwpe, const float* dx, int b, int t, int c) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)t * c) return;
    float s = 0.0f;
    for (int bi = 0; bi < b; bi++) s += dx[(int64_t)bi * t * c + i];
    dwpe[i] = s;
}

// out[r] = x[r] + bias (x may be null: out[r] = bias).
extern "C" __global__ void add_rows(float* out, const float* x, const float* bias, int n, int c) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)n * c) return;
    float v = bias[i % c];
    out[i] = x ? x[i] + v : v;
}

// LayerNorm over rows, one warp per row; the mean and 1/std are kept for the backward pass.
template <class O>
__device__ void layer_norm_rows(O* out, float* mean, float* rstd, const float* x, const float* w,
                                const float* b, int n, int c, float eps) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= n) return;
    const float* xr = x + (int64_t)row * c;
    float s = 0.0f;
    for (int j = lane; j < c; j += WARP) s += xr[j];
    float m = warp_sum(s) / c;
    float v = 0.0f;
    for (int j = lane; j < c; j += WARP) {
        float d = xr[j] - m;
        v += d * d;
    }
    float rs = rsqrtf(warp_sum(v) / c + eps);
    O* o = out + (int64_t)row * c;
    for (int j = lane; j < c; j += WARP) put(&o[j], (xr[j] - m) * rs * w[j] + b[j]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

extern "C" __global__ void layer_norm_fwd(float* out, float* mean, float* rstd, const float* x,
                                          const float* w, const float* b, int n, int c,
                                          float eps) {
    layer_norm_rows(out, mean, rstd, x, w, b, n, c, eps);
}

extern "C" __global__ void layer_norm_fwd_bf16(uint16_t* out, float* mean, float* rstd,
                                               const float* x, const float* w, const float* b,
                                               int n, int c, float eps) {
    layer_norm_rows(out, mean, rstd, x, w, b, n, c, eps);
}

// LayerNorm's backward, one warp per row: dx (= or +=) the input's gradient (and its bf16 copy
// where dx16 is given); the weight's and bias's gradients come from norm_weight_sums.
extern "C" __global__ void layer_norm_bwd(float* dx, uint16_t* dx16, const float* dy,
                                          const float* x, const float* w, const float* mean,
                                          const float* rstd, int n, int c, int accumulate) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= n) return;
    int64_t off = (int64_t)row * c;
    float m = mean[row], rs = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = lane; j < c; j += WARP) {
        float xh = (x[off + j] - m) * rs;
        float dn = dy[off + j] * w[j];
        s1 += dn;
        s2 += dn * xh;
    }
    s1 = warp_sum(s1) / c;
    s2 = warp_sum(s2) / c;
    for (int j = lane; j < c; j += WARP) {
        float xh = (x[off + j] - m) * rs;
        float g = dy[off + j];
        float d = (g * w[j] - s1 - xh * s2) * rs;
        float out = accumulate ? dx[off + j] + d : d;
        dx[off + j] = out;
        if (dx16) dx16[off + j] = bf16_bits(out);
    }
}

// out[r] = table[ids[r]] (token embeddings without positions), one thread per element.
extern "C" __global__ void gather_rows(float* out, const float* table, const uint32_t* ids, int n,
                                       int c) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)n * c) return;
  out[i] = table[(int64_t)ids[i / c] * c + i % c];
}

// RMSNorm over rows, one warp per row: out = x · rstd ⊙ w with rstd = 1/√(mean(x²) + eps), kept
// for the backward pass.
template <class O>
__device__ void rms_norm_rows(O* out, float* rstd, const float* x, const float* w, int n, int c,
                              float eps) {
  int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= n) return;
  const float* xr = x + (int64_t)row * c;
  float s = 0.0f;
  for (int j = lane; j < c; j += WARP) s += xr[j] * xr[j];
  float rs = rsqrtf(warp_sum(s) / c + eps);
  O* o = out + (int64_t)row * c;
  for (int j = lane; j < c; j += WARP) put(&o[j], xr[j] * rs * w[j]);
  if (lane == 0) rstd[row] = rs;
}

extern "C" __global__ void rms_norm_fwd(float* out, float* rstd, const float* x, const float* w,
                                        int n, int c, float eps) {
  rms_norm_rows(out, rstd, x, w, n, c, eps);
}

extern "C" __global__ void rms_norm_fwd_bf16(uint16_t* out, float* rstd, const float* x,
                                             const float* w, int n, int c, float eps) {
  rms_norm_rows(out, rstd, x, w, n, c, eps);
}

// RMSNorm's backward, one warp per row: dx (= or +=) rstd·(dy⊙w − x̂·mean(dy⊙w⊙x̂)) with
// x̂ = x·rstd; the weight's gradient comes from norm_weight_sums.
extern "C" __global__ void rms_norm_bwd(float* dx, uint16_t* dx16, const float* dy,
                                        const float* x, const float* w, const float* rstd, int n,
                                        int c, int accumulate) {
  int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  int lane = threadIdx.x % WARP;
  if (row >= n) return;
  int64_t off = (int64_t)row * c;
  float rs = rstd[row];
  float s = 0.0f;
  for (int j = lane; j < c; j += WARP) s += dy[off + j] * w[j] * x[off + j] * rs;
  s = warp_sum(s) / c;
  for (int j = lane; j < c; j += WARP) {
    float xh = x[off + j] * rs, g = dy[off + j];
    float d = rs * (g * w[j] - xh * s);
    float out = accumulate ? dx[off + j] + d : d;
    dx[off + j] = out;
    if (dx16) dx16[off + j] = bf16_bits(out);
  }
}

// Rotary embedding in place ("rotate half"): the first `heads` heads of hd columns of each row of
// x [n, ld], row r at position r mod t of table [positions, hd] (each row: the hd/2 cos(θ), then
// their sin(θ)); sign −1 rotates by −θ (the backward pass). One thread per rotated pair, in place:
// f32 (rope_rows), or bf16 as a bf16 product wrote it (rope_rows_h16).
template <class T>
__device__ void rope_pairs(T* x, const float* table, int n, int ld, int t, int heads, int hd,
                           float sign) {
  int half = hd / 2;
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)n * heads * half) return;
  int j = i % half;
  int64_t rh = i / half;
  int h = rh % heads, r = rh / heads;
  const float* tr = table + (int64_t)(r % t) * hd;
  float co = tr[j], si = sign * tr[half + j];
  T* p = x + (int64_t)r * ld + h * hd;
  float a = get(&p[j]), b = get(&p[half + j]);
  put(&p[j], a * co - b * si);
  put(&p[half + j], b * co + a * si);
}

extern "C" __global__ void rope_rows(float* x, const float* table, int n, int ld, int t,
                                     int heads, int hd, float sign) {
  rope_pairs(x, table, n, ld, t, heads, hd, sign);
}

extern "C" __global__ void rope_rows_h16(uint16_t* x, const float* table, int n, int ld, int t,
                                         int heads, int hd, float sign) {
  rope_pairs(x, table, n, ld, t, heads, hd, sign);
}

// The rotation and the rounding to bf16 in one pass, into a new buffer: out [n, ld] bf16 from
// x [n, ld] f32, the first heads·hd columns of each row rotated as rope_rows rotates them and the
// rest rounded as they are (the backward pass's q|k|v gradient as the products' operand). Grid:
// column blocks × row groups, each thread one column down the rows of its group.
extern "C" __global__ void rope_rows_bf16(uint16_t* out, const float* x, const float* table, int n,
                                          int ld, int t, int heads, int hd, float sign) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= ld) return;
  int half = hd / 2, j = c % hd;
  bool rotated = c < heads * hd, first = j < half;
  int k = first ? j : j - half;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const float* xr = x + r * ld;
    float v = xr[c];
    if (rotated) {
      const float* tr = table + (r % t) * hd;
      float co = tr[k], si = sign * tr[half + k];
      v = first ? v * co - xr[c + half] * si : v * co + xr[c - half] * si;
    }
    out[r * ld + c] = bf16_bits(v);
  }
}

// SwiGLU: g = silu(gate) ⊙ up over rows of cols, gate's rows ldg apart and up's ldu (the halves
// of a stacked gate|up product's output, read in place; cols for separate ones), g [rows, cols];
// gate and up f32 (or bf16 where their product wrote them in bf16: swiglu_fwd_h16), g f32 or bf16.
// Training's and inference's. Grid: column blocks × row groups, each block's threads down the
// rows of its group.
template <class O, class I>
__device__ void swiglu_elements(O* g, const I* gate, const I* up, int64_t rows, int cols,
                                int64_t ldg, int64_t ldu) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float x = get(&gate[r * ldg + c]);
    put(&g[r * cols + c], x / (1.0f + __expf(-x)) * get(&up[r * ldu + c]));
  }
}

extern "C" __global__ void swiglu_fwd(float* g, const float* gate, const float* up, int64_t rows,
                                      int cols, int64_t ldg, int64_t ldu) {
  swiglu_elements(g, gate, up, rows, cols, ldg, ldu);
}

extern "C" __global__ void swiglu_fwd_bf16(uint16_t* g, const float* gate, const float* up,
                                           int64_t rows, int cols, int64_t ldg, int64_t ldu) {
  swiglu_elements(g, gate, up, rows, cols, ldg, ldu);
}

extern "C" __global__ void swiglu_fwd_h16(uint16_t* g, const uint16_t* gate, const uint16_t* up,
                                          int64_t rows, int cols, int64_t ldg, int64_t ldu) {
  swiglu_elements(g, gate, up, rows, cols, ldg, ldu);
}

// SwiGLU's backward: dgate and dup from dg ([rows, cols]) and the forward's gate and up, laid out
// as the forward's (rows ld apart), the gradients too (in gate's and up's place for f32
// gradients; swiglu_bwd_bf16: bf16 gradients, only products' operands, into new buffers;
// swiglu_bwd_h16: gate, up and dg in bf16 as the products wrote them, and the bf16 gradients,
// which may be written in gate's and up's place). Grid as the forward's.
template <class O, class I>
__device__ void swiglu_bwd_elements(O* dgate, O* dup, const I* gate, const I* up, const I* dg,
                                    int64_t rows, int cols, int64_t ld) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    int64_t i = r * ld + c;
    float x = get(&gate[i]), u = get(&up[i]), d = get(&dg[r * cols + c]);
    float sg = 1.0f / (1.0f + __expf(-x));
    put(&dgate[i], d * u * sg * (1.0f + x * (1.0f - sg)));
    put(&dup[i], d * x * sg);
  }
}

extern "C" __global__ void swiglu_bwd(float* dgate, float* dup, const float* gate,
                                      const float* up, const float* dg, int64_t rows, int cols,
                                      int64_t ld) {
  swiglu_bwd_elements(dgate, dup, gate, up, dg, rows, cols, ld);
}

extern "C" __global__ void swiglu_bwd_bf16(uint16_t* dgate, uint16_t* dup, const float* gate,
                                           const float* up, const float* dg, int64_t rows,
                                           int cols, int64_t ld) {
  swiglu_bwd_elements(dgate, dup, gate, up, dg, rows, cols, ld);
}

extern "C" __global__ void swiglu_bwd_h16(uint16_t* dgate, uint16_t* dup, const uint16_t* gate,
                                          const uint16_t* up, const uint16_t* dg, int64_t rows,
                                          int cols, int64_t ld) {
  swiglu_bwd_elements(dgate, dup, gate, up, dg, rows, cols, ld);
}

// GELU, tanh approximation (gelu_new), and its derivative.
#define GELU_K 0.7978845608028654f  // sqrt(2/pi)
template <class O>
__device__ void gelu_elements(O* out, const float* h, int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float x = h[i];
    put(&out[i], 0.5f * x * (1.0f + tanhf(GELU_K * (x + 0.044715f * x * x * x))));
}

extern "C" __global__ void gelu_fwd(float* out, const float* h, int64_t len) {
    gelu_elements(out, h, len);
}

extern "C" __global__ void gelu_fwd_bf16(uint16_t* out, const float* h, int64_t len) {
    gelu_elements(out, h, len);
}

// The activations' backward: dh from dg (dh may be dg) and the forward's input h (f32, or bf16
// where the product's epilogue kept it: gelu_bwd_h16); with dh16 (not null) also dh rounded to
// bf16, the products' operand.
template <class H>
__device__ void gelu_bwd_elements(float* dh, uint16_t* dh16, const H* h, const float* dg,
                                  int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float x = get(&h[i]);
    float u = GELU_K * (x + 0.044715f * x * x * x);
    float th = tanhf(u);
    float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
    float d = dg[i] * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
    dh[i] = d;
    if (dh16) dh16[i] = bf16_bits(d);
}

extern "C" __global__ void gelu_bwd(float* dh, uint16_t* dh16, const float* h, const float* dg,
                                    int64_t len) {
    gelu_bwd_elements(dh, dh16, h, dg, len);
}

extern "C" __global__ void gelu_bwd_h16(float* dh, uint16_t* dh16, const uint16_t* h,
                                        const float* dg, int64_t len) {
    gelu_bwd_elements(dh, dh16, h, dg, len);
}

template <class O>
__device__ void relu_elements(O* out, const float* h, int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    put(&out[i], fmaxf(h[i], 0.0f));
}

extern "C" __global__ void relu_fwd(float* out, const float* h, int64_t len) {
    relu_elements(out, h, len);
}

extern "C" __global__ void relu_fwd_bf16(uint16_t* out, const float* h, int64_t len) {
    relu_elements(out, h, len);
}

// out = x rounded to bf16 (a product's operand).
extern "C" __global__ void to_bf16(uint16_t* out, const float* x, int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) out[i] = bf16_bits(x[i]);
}

// out = x (bf16 values in f32).
extern "C" __global__ void from_bf16(float* out, const uint16_t* x, int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) out[i] = bf16_value(x[i]);
}

extern "C" __global__ void relu_bwd(float* dh, uint16_t* dh16, const float* h, const float* dg,
                                    int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float d = h[i] > 0.0f ? dg[i] : 0.0f;
    dh[i] = d;
    if (dh16) dh16[i] = bf16_bits(d);
}

// Causal softmax in place over rows of [groups, t, t] scores: row i keeps columns 0..=i, scaled by
// `scale`; the columns above the diagonal become 0. One warp per row.
extern "C" __global__ void softmax_causal_fwd(float* p, int64_t rows, int t, float scale) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    int i = row % t;
    float* r = p + row * t;
    float mx = -INFINITY;
    for (int j = lane; j <= i; j += WARP) mx = fmaxf(mx, r[j] * scale);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int j = lane; j <= i; j += WARP) {
        float e = __expf(r[j] * scale - mx);
        r[j] = e;
        s += e;
    }
    float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < t; j += WARP) r[j] = j <= i ? r[j] * inv : 0.0f;
}

// dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)), in place in dP; 0 above the diagonal.
extern "C" __global__ void softmax_causal_bwd(float* dp, const float* p, int64_t rows, int t,
                                              float scale) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    int i = row % t;
    float* d = dp + row * t;
    const float* pr = p + row * t;
    float s = 0.0f;
    for (int j = lane; j <= i; j += WARP) s += d[j] * pr[j];
    s = warp_sum(s);
    for (int j = lane; j < t; j += WARP) d[j] = j <= i ? scale * pr[j] * (d[j] - s) : 0.0f;
}

// Cross-entropy of each row of logits [rows, v] against its target, the logits replaced by the
// loss's gradient times `sc` (softmax − one-hot); loss[r] = logsumexp − logit[target]. One block
// per row. The logits f32, or bf16 (cross_entropy_bf16: as autocast's bf16 output layer gives
// them; the softmax in f32, the gradient rounded to bf16 in their place).
template <class T>
__device__ void cross_entropy_row(T* logits, float* loss, const uint32_t* targets, int v,
                                  float sc) {
    __shared__ float shared[WARP];
    int64_t row = blockIdx.x;
    T* r = logits + row * v;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, get(&r[j]));
    mx = block_max(mx, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += __expf(get(&r[j]) - mx);
    s = block_sum(s, shared);
    int y = targets[row];
    float target_logit = get(&r[y]);
    __syncthreads();
    float inv = 1.0f / s;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float q = __expf(get(&r[j]) - mx) * inv;
        put(&r[j], (q - (j == y ? 1.0f : 0.0f)) * sc);
    }
    if (threadIdx.x == 0) loss[row] = logf(s) + mx - target_logit;
}

extern "C" __global__ void cross_entropy(float* logits, float* loss, const uint32_t* targets,
                                         int v, float sc) {
    cross_entropy_row(logits, loss, targets, v, sc);
}

extern "C" __global__ void cross_entropy_bf16(uint16_t* logits, float* loss,
                                              const uint32_t* targets, int v, float sc) {
    cross_entropy_row(logits, loss, targets, v, sc);
}

// Threads of a block of the column sums (8 warps of row groups).
#define SUM_THREADS 256

// V adjacent values of type T, read in one load (V·sizeof(T) bytes, aligned to that).
template <int V, class T>
struct alignas(V * sizeof(T)) Lanes {
    T v[V];
};

// The V adjacent values at p (aligned to V values) as f32s, into out[0..V).
template <int V, class T>
__device__ __forceinline__ void load_lanes(float* out, const T* p) {
    Lanes<V, T> l = *reinterpret_cast<const Lanes<V, T>*>(p);
#pragma unroll
    for (int v = 0; v < V; v++) out[v] = get(&l.v[v]);
}

// Column sums, K at a time, over rows [y·per, min(n, (y + 1)·per)) of the n rows for the grid's
// row y (the gradients of a bias or a norm's weight, or their partial sums over chunks of rows):
// add(r, col, s) adds row r's values of columns col..col+V into s[k][0..V) for k < K, and
// out[k][y·cols + col] gets the k-th sum (out[k] null: not written); cols is a multiple of V. A
// block of 8 warps per 32·V columns and chunk, thread (g, j) summing every 8th row from g of its
// V adjacent columns (a warp reads 32·V adjacent columns of a row, V a lane in one load: 512
// bytes of f32 rows with V = 4), then the 8 partial sums of each column added in order: f32, the
// same order every run.
template <int K, int V, class Add>
__device__ void column_sums_by(float* const (&out)[K], int n, int cols, int per, Add add) {
    constexpr int GROUPS = SUM_THREADS / WARP, SPAN = WARP * V;
    __shared__ float part[K][GROUPS][SPAN];
    int j = threadIdx.x % WARP, g = threadIdx.x / WARP;
    int base = blockIdx.x * SPAN, col = base + j * V;
    int64_t first = (int64_t)blockIdx.y * per;
    int64_t end = first + per < n ? first + per : n;
    float s[K][V] = {};
    if (col < cols) {
#pragma unroll 4
        for (int64_t r = first + g; r < end; r += GROUPS) add(r, col, s);
    }
    for (int k = 0; k < K; k++)
        for (int v = 0; v < V; v++) part[k][g][j * V + v] = s[k][v];
    __syncthreads();
    for (int k = 0; k < K; k++) {
        if (!out[k]) continue;
        for (int c = threadIdx.x; c < SPAN && base + c < cols; c += SUM_THREADS) {
            float t = 0.0f;
            for (int q = 0; q < GROUPS; q++) t += part[k][q][c];
            out[k][(int64_t)blockIdx.y * cols + base + c] = t;
        }
    }
}

// out[y·cols + j] = Σ_r src[r·cols + j] (f32 or bf16 rows), as column_sums_by.
template <int V, class I>
__device__ void column_sums_rows(float* out, const I* src, int n, int cols, int per) {
    float* const outs[1] = {out};
    column_sums_by<1, V>(outs, n, cols, per, [&](int64_t r, int col, float (*s)[V]) {
        float a[V];
        load_lanes<V>(a, &src[r * cols + col]);
#pragma unroll
        for (int v = 0; v < V; v++) s[0][v] += a[v];
    });
}

// The kernels: f32 rows one column a lane, or four (cols a multiple of 4, rows 16-byte
// aligned); bf16 rows one or eight (the same).
extern "C" __global__ void column_sums(float* out, const float* src, int n, int cols, int per) {
    column_sums_rows<1>(out, src, n, cols, per);
}

extern "C" __global__ void column_sums_v4(float* out, const float* src, int n, int cols,
                                          int per) {
    column_sums_rows<4>(out, src, n, cols, per);
}

extern "C" __global__ void column_sums_h16(float* out, const uint16_t* src, int n, int cols,
                                           int per) {
    column_sums_rows<1>(out, src, n, cols, per);
}

extern "C" __global__ void column_sums_h16_v8(float* out, const uint16_t* src, int n, int cols,
                                              int per) {
    column_sums_rows<8>(out, src, n, cols, per);
}

// A norm's weight and bias gradients, as column_sums_by: dw[y·c + j] = Σ_r dy[r, j]·x̂[r, j] with
// x̂ = (x − mean[r])·rstd[r] (mean null: RMSNorm's x·rstd[r]), and db[y·c + j] = Σ_r dy[r, j]
// where db is given — one read of dy and x instead of writing dy ⊙ x̂ and summing it and dy apart.
template <int V>
__device__ void norm_weight_sums_by(float* dw, float* db, const float* dy, const float* x,
                                    const float* mean, const float* rstd, int n, int c, int per) {
    float* const outs[2] = {dw, db};
    column_sums_by<2, V>(outs, n, c, per, [&](int64_t r, int col, float (*s)[V]) {
        float d[V], xs[V];
        load_lanes<V>(d, &dy[r * c + col]);
        load_lanes<V>(xs, &x[r * c + col]);
        float centre = mean ? mean[r] : 0.0f, scale = rstd[r];
#pragma unroll
        for (int v = 0; v < V; v++) {
            s[0][v] += d[v] * ((xs[v] - centre) * scale);
            s[1][v] += d[v];
        }
    });
}

extern "C" __global__ void norm_weight_sums(float* dw, float* db, const float* dy, const float* x,
                                            const float* mean, const float* rstd, int n, int c,
                                            int per) {
    norm_weight_sums_by<1>(dw, db, dy, x, mean, rstd, n, c, per);
}

// The same four columns a lane (c a multiple of 4, dy and x 16-byte aligned).
extern "C" __global__ void norm_weight_sums_v4(float* dw, float* db, const float* dy,
                                               const float* x, const float* mean,
                                               const float* rstd, int n, int c, int per) {
    norm_weight_sums_by<4>(dw, db, dy, x, mean, rstd, n, c, per);
}

// out = value everywhere.
extern "C" __global__ void fill(float* out, float value, int64_t len) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) out[i] = value;
}

// A run of one parameter's elements for the kernels below, which take every parameter in one
// launch: a block per chunk (cuda.rs's Chunk, 48 bytes; pointers already at the chunk's start).
struct Chunk {
  float* th;
  const float* g;
  float* m;
  float* v;
  int64_t len;
  float keep;  // 1 - lr * weight decay (1 without decay)
  float pad;
};

// AdamW over every chunk, in place: m <- b1*m + (1-b1)*x, v <- b2*v + (1-b2)*x^2 with x = s*g,
// then th <- keep*th - lr*(m/bc1) / (sqrt(v/bc2) + eps).
extern "C" __global__ void adam_chunks(const Chunk* chunks, float beta1, float beta2, float scale,
                                       float lr, float ibc1, float ibc2, float eps) {
  const Chunk c = chunks[blockIdx.x];
  for (int64_t i = threadIdx.x; i < c.len; i += blockDim.x) {
    float x = scale * c.g[i];
    float m = beta1 * c.m[i] + (1.0f - beta1) * x;
    float v = beta2 * c.v[i] + (1.0f - beta2) * (x * x);
    c.m[i] = m;
    c.v[i] = v;
    float u = (m * ibc1) / (sqrtf(v * ibc2) + eps);
    c.th[i] = c.th[i] * c.keep - lr * u;
  }
}

// Sums of squares (in f64) of the chunks' gradients: block k writes out[k]; the host adds them
// in order, so the total is the same every run.
extern "C" __global__ void sum_squares_chunks(double* out, const Chunk* chunks) {
  __shared__ double shared[WARP];
  const Chunk c = chunks[blockIdx.x];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < c.len; i += blockDim.x) {
    double v = c.g[i];
    s += v * v;
  }
  for (int o = WARP / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
  int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
  if (lane == 0) shared[wid] = s;
  __syncthreads();
  if (wid == 0) {
    s = lane < nw ? shared[lane] : 0.0;
    for (int o = WARP / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) out[blockIdx.x] = s;
  }
}
