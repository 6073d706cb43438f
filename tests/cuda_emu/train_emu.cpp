// The kernels of crates/lmkit-kernels/src/cuda/train.cu on the CPU (the emulation of
// crates/lmkit-kernels/src/cuda/emu.h), launched with the grids crates/lmkit-kernels/src/cuda.rs
// uses (256 threads a block: a thread per element, or a warp per row; a block of 1024 per row for
// the cross-entropy): a shared library for tests/parity/test_cuda_kernels.py.
#include "../../crates/lmkit-kernels/src/cuda/emu.h"

#include <vector>

#include "../../crates/lmkit-kernels/src/cuda/train.cu"

namespace {
constexpr dim3 THREADS = {256, 1, 1};
dim3 per_element(int64_t len) { return {unsigned((len + 255) / 256), 1, 1}; }
dim3 per_row(int64_t rows) { return {unsigned((rows + 7) / 8), 1, 1}; }
// Blocks of columns, each going down the rows of its group.
dim3 per_column(int64_t rows, int cols) {
  return {unsigned((cols + 255) / 256), unsigned(rows < 1 ? 1 : rows > 65535 ? 65535 : rows), 1};
}
}  // namespace

extern "C" void emu_gather_rows(float* out, const float* table, const uint32_t* ids, int n, int c) {
  emu::launch(per_element((int64_t)n * c), THREADS, 0, [&] { gather_rows(out, table, ids, n, c); });
}

extern "C" void emu_rms_norm_fwd(float* out, float* rstd, const float* x, const float* w, int n,
                                 int c, float eps) {
  emu::launch(per_row(n), THREADS, 0, [&] { rms_norm_fwd(out, rstd, x, w, n, c, eps); });
}

extern "C" void emu_rms_norm_bwd(float* dx, const float* dy, const float* x, const float* w,
                                 const float* rstd, int n, int c, int accumulate) {
  emu::launch(per_row(n), THREADS, 0,
              [&] { rms_norm_bwd(dx, nullptr, dy, x, w, rstd, n, c, accumulate); });
}

extern "C" void emu_rope_rows(float* x, const float* table, int n, int ld, int t, int heads, int hd,
                              float sign) {
  emu::launch(per_element((int64_t)n * heads * (hd / 2)), THREADS, 0,
              [&] { rope_rows(x, table, n, ld, t, heads, hd, sign); });
}

// gate's and up's rows ld apart (the halves of a stacked gate|up), g and dg [rows, cols].
extern "C" void emu_swiglu_fwd(float* g, const float* gate, const float* up, int64_t rows, int cols,
                               int64_t ld) {
  emu::launch(per_column(rows, cols), THREADS, 0,
              [&] { swiglu_fwd(g, gate, up, rows, cols, ld, ld); });
}

extern "C" void emu_swiglu_bwd(float* gate, float* up, const float* dg, int64_t rows, int cols,
                               int64_t ld) {
  emu::launch(per_column(rows, cols), THREADS, 0,
              [&] { swiglu_bwd(gate, up, gate, up, dg, rows, cols, ld); });
}

extern "C" void emu_cross_entropy(float* logits, float* loss, const uint32_t* targets, int rows,
                                  int v, float sc) {
  emu::launch({unsigned(rows), 1, 1}, {1024, 1, 1}, 0,
              [&] { cross_entropy(logits, loss, targets, v, sc); });
}

extern "C" void emu_cross_entropy_bf16(uint16_t* logits, float* loss, const uint32_t* targets,
                                       int rows, int v, float sc) {
  emu::launch({unsigned(rows), 1, 1}, {1024, 1, 1}, 0,
              [&] { cross_entropy_bf16(logits, loss, targets, v, sc); });
}

// The column sums' first or second stage as `Gpu::column_sums` launches it: `vec` columns a lane
// (1, or 4 for f32 rows and 8 for bf16 rows, 16-byte aligned), blocks of 256 threads.
static dim3 sums_grid(int cols, int vec, int chunks) {
  return {unsigned((cols + 32 * vec - 1) / (32 * vec)), unsigned(chunks), 1};
}

extern "C" void emu_column_sums(float* out, const float* src, int n, int cols, int per,
                                int chunks, int vec) {
  emu::launch(sums_grid(cols, vec, chunks), {SUM_THREADS, 1, 1}, 0, [&] {
    if (vec == 1) column_sums(out, src, n, cols, per);
    else column_sums_v4(out, src, n, cols, per);
  });
}

extern "C" void emu_column_sums_h16(float* out, const uint16_t* src, int n, int cols, int per,
                                    int chunks, int vec) {
  emu::launch(sums_grid(cols, vec, chunks), {SUM_THREADS, 1, 1}, 0, [&] {
    if (vec == 1) column_sums_h16(out, src, n, cols, per);
    else column_sums_h16_v8(out, src, n, cols, per);
  });
}

extern "C" void emu_layer_norm_fwd(float* out, float* mean, float* rstd, const float* x,
                                   const float* w, const float* b, int n, int c, float eps) {
  emu::launch(per_row(n), THREADS, 0, [&] { layer_norm_fwd(out, mean, rstd, x, w, b, n, c, eps); });
}

extern "C" void emu_layer_norm_fwd_bf16(uint16_t* out, float* mean, float* rstd, const float* x,
                                        const float* w, const float* b, int n, int c, float eps) {
  emu::launch(per_row(n), THREADS, 0,
              [&] { layer_norm_fwd_bf16(out, mean, rstd, x, w, b, n, c, eps); });
}

extern "C" void emu_rms_norm_fwd_bf16(uint16_t* out, float* rstd, const float* x, const float* w,
                                      int n, int c, float eps) {
  emu::launch(per_row(n), THREADS, 0, [&] { rms_norm_fwd_bf16(out, rstd, x, w, n, c, eps); });
}

extern "C" void emu_swiglu_fwd_bf16(uint16_t* g, const float* gate, const float* up, int64_t rows,
                                    int cols, int64_t ld) {
  emu::launch(per_column(rows, cols), THREADS, 0,
              [&] { swiglu_fwd_bf16(g, gate, up, rows, cols, ld, ld); });
}

// The activation `gelu` (1) or ReLU (0) of h, into f32 (`bf16` 0) or bf16 (1) elements.
extern "C" void emu_act_fwd(int gelu, int bf16, void* out, const float* h, int64_t len) {
  emu::launch(per_element(len), THREADS, 0, [&] {
    if (bf16) {
      if (gelu) gelu_fwd_bf16(static_cast<uint16_t*>(out), h, len);
      else relu_fwd_bf16(static_cast<uint16_t*>(out), h, len);
    } else {
      if (gelu) gelu_fwd(static_cast<float*>(out), h, len);
      else relu_fwd(static_cast<float*>(out), h, len);
    }
  });
}

extern "C" void emu_to_bf16(uint16_t* out, const float* x, int64_t len) {
  emu::launch(per_element(len), THREADS, 0, [&] { to_bf16(out, x, len); });
}

extern "C" void emu_layer_norm_bwd(float* dx, const float* dy, const float* x, const float* w,
                                   const float* mean, const float* rstd, int n, int c,
                                   int accumulate) {
  emu::launch(per_row(n), THREADS, 0,
              [&] { layer_norm_bwd(dx, nullptr, dy, x, w, mean, rstd, n, c, accumulate); });
}

// The norm weight gradients' first stage, `chunks` rows of partial sums (mean null: RMSNorm's).
extern "C" void emu_norm_weight_sums(float* dw, float* db, const float* dy, const float* x,
                                     const float* mean, const float* rstd, int n, int c, int per,
                                     int chunks, int vec) {
  emu::launch(sums_grid(c, vec, chunks), {SUM_THREADS, 1, 1}, 0, [&] {
    if (vec == 1) norm_weight_sums(dw, db, dy, x, mean, rstd, n, c, per);
    else norm_weight_sums_v4(dw, db, dy, x, mean, rstd, n, c, per);
  });
}

extern "C" void emu_softmax_causal(float* p, int64_t rows, int t, float scale, const float* probs,
                                   int backward) {
  emu::launch(per_row(rows), THREADS, 0, [&] {
    if (backward) softmax_causal_bwd(p, probs, rows, t, scale);
    else softmax_causal_fwd(p, rows, t, scale);
  });
}

extern "C" void emu_embed(float* x, const float* wte, const float* wpe, const uint32_t* ids, int b,
                          int t, int c, float* dwte, float* dwpe, const float* dx) {
  int n = b * t;
  emu::launch(per_element((int64_t)n * c), THREADS, 0, [&] { embed_fwd(x, wte, wpe, ids, n, t, c); });
  emu::launch(per_element((int64_t)n * c), THREADS, 0, [&] { embed_bwd_tokens(dwte, dx, ids, n, c); });
  emu::launch(per_element((int64_t)t * c), THREADS, 0, [&] { embed_bwd_positions(dwpe, dx, b, t, c); });
}

namespace {
// cuda.rs's chunk table: every parameter split into runs of `chunk` elements.
std::vector<Chunk> chunks_of(int count, float** th, const float** g, float** m, float** v,
                             const int64_t* lens, const float* keeps, int64_t chunk) {
  std::vector<Chunk> table;
  for (int p = 0; p < count; p++)
    for (int64_t s = 0; s < lens[p]; s += chunk)
      table.push_back({th[p] + s, g[p] + s, m[p] + s, v[p] + s, std::min(chunk, lens[p] - s),
                       keeps[p], 0.0f});
  return table;
}
}  // namespace

extern "C" void emu_adamw(int count, float** th, const float** g, float** m, float** v,
                          const int64_t* lens, const float* keeps, int64_t chunk, float beta1,
                          float beta2, float gscale, float lr, float ibc1, float ibc2, float eps) {
  auto table = chunks_of(count, th, g, m, v, lens, keeps, chunk);
  emu::launch({unsigned(table.size()), 1, 1}, THREADS, 0,
              [&] { adam_chunks(table.data(), beta1, beta2, gscale, lr, ibc1, ibc2, eps); });
}

extern "C" double emu_sum_squares(int count, const float** x, const int64_t* lens, int64_t chunk) {
  // As cuda.rs: the table's other operands point at x too (the kernel reads only g).
  std::vector<float*> xs;
  for (int p = 0; p < count; p++) xs.push_back(const_cast<float*>(x[p]));
  std::vector<float> ones(count, 1.0f);
  auto table = chunks_of(count, xs.data(), x, xs.data(), xs.data(), lens, ones.data(), chunk);
  std::vector<double> parts(table.size(), 0.0);
  emu::launch({unsigned(table.size()), 1, 1}, THREADS, 0,
              [&] { sum_squares_chunks(parts.data(), table.data()); });
  double s = 0;
  for (double p : parts) s += p;
  return s;
}
