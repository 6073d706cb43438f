// The attention kernels of crates/lmkit-kernels/src/cuda/attention.cu (TF32 and bf16, on f32 or
// bf16 inputs) on the CPU
// (the emulation of crates/lmkit-kernels/src/cuda/emu.h), launched as
// crates/lmkit-kernels/src/cuda.rs launches them on the GPU: a shared library for
// tests/parity/test_cuda_kernels.py. Built by the test:
//   g++ -std=c++20 -O2 -shared -fPIC -pthread -o attention_emu.so tests/cuda_emu/attention_emu.cpp
#include "../../crates/lmkit-kernels/src/cuda/emu.h"

#include "../../crates/lmkit-kernels/src/cuda/attention.cu"

#include <type_traits>
#include <vector>

namespace {

// The kernels' tiles (attention.cu's ATT_KERNELS): keys per tile of the forward and dQ kernels,
// queries per tile of the dK/dV kernel.
int keys(int hd, bool bf16) { return hd == 128 && !bf16 ? 32 : 64; }
int queries(int hd) { return hd == 128 ? 32 : 64; }

// Bytes of dynamic shared memory per block: the operand tiles (cuda.rs sizes them alike; the
// streamed ones twice with bf16 inputs), for the dK/dV kernel also the query tiles' log-sum-exps
// and row dots. mode: 0 TF32, 1 bf16 on f32 inputs, 2 bf16 on bf16 inputs.
size_t tile_bytes(int rows, int hd, bool bf16) {
  return bf16 ? 2 * size_t(rows) * (hd + Bf16::PAD) : 4 * size_t(rows) * (hd + Tf32::PAD);
}
int streamed(int mode) { return mode == 2 ? 4 : 2; }
size_t fwd_bytes(int hd, int mode, int rows) {
  return tile_bytes(rows + streamed(mode) * keys(hd, mode > 0), hd, mode > 0);
}
size_t dq_bytes(int hd, int mode, int rows) {
  // The 128-row dQ kernel streams tiles of 32 keys.
  int k = rows == ATT_ROWS ? keys(hd, mode > 0) : 32;
  return tile_bytes(2 * rows + streamed(mode) * k, hd, mode > 0);
}
size_t dkdv_bytes(int hd, int mode, int rows) {
  // The 128-key dK/dV kernel (bf16 products) streams tiles of 32 queries.
  bool two = rows != ATT_ROWS && mode > 0;
  int keys_ = two ? rows : ATT_ROWS, q = two ? 32 : queries(hd);
  return tile_bytes(2 * keys_ + streamed(mode) * q, hd, mode > 0) + 4 * size_t(streamed(mode) * q);
}

dim3 grid(int t, int bh, int rows = ATT_ROWS) { return {unsigned((t + rows - 1) / rows), unsigned(bh), 1}; }
constexpr dim3 THREADS = {ATT_THREADS, 1, 1};

}  // namespace

// The inputs as a kernel takes them: f32, or (`mode` 2) the bf16 bits the caller passed.
template <class S>
const S* in(const float* p) {
  return reinterpret_cast<const S*>(p);
}

// o as the kernels of mode 2 write it: bf16 bits (the f32 values rounded; exact for values that
// are bf16 already).
std::vector<uint16_t> bf16_rows(const float* o, size_t len) {
  std::vector<uint16_t> h(len);
  for (size_t i = 0; i < len; i++) h[i] = emu_bf16(o[i]);
  return h;
}

// dims: b, t, heads, kv_heads, hd; ld: ldq, ldk, ldv, ldo (forward) or ldq, ldk, ldv, ldd, then
// the outputs' (backward); mode: as above (with 2, q, k, v and dout hold bf16 bits, and the
// kernels' o is bf16: written into `o` widened, and read by the backward rounded). Returns 0, or
// 1 for an unsupported head size. `rows`: the forward and dQ kernels' rows per block, 64
// (`_fwd_`, `_bwd_dq_`) or 128 (`_fwd2_`, `_bwd_dq2_`: head sizes 32 and 64), and the dK/dV
// kernel's keys with bf16 products (`_bwd_dkdv2_`).
extern "C" int emu_flash_fwd(const float* q, const float* k, const float* v, float* o, float* lse,
                             const int* dims, const int* ld, float scale, int mode, int rows) {
  int b = dims[0], t = dims[1], heads = dims[2], kvh = dims[3], hd = dims[4];
  size_t o_len = size_t(b * t - 1) * ld[3] + size_t(heads) * hd;
  auto run = [&](auto kernel, auto s) {
    using S = decltype(s);
    size_t bytes = fwd_bytes(hd, mode, rows);
    // A bf16 o starts as NaNs, as `o` does.
    std::vector<S> out(o_len, S(0x7fc0));
    if constexpr (std::is_same_v<S, float>) std::copy(o, o + o_len, out.begin());
    emu::launch(grid(t, b * heads, rows), THREADS, bytes, [&] {
      kernel(in<S>(q), in<S>(k), in<S>(v), out.data(), lse, t, heads, kvh, ld[0], ld[1], ld[2],
             ld[3], scale);
    });
    for (size_t i = 0; i < o_len; i++) o[i] = elem(out[i]);
  };
  float f = 0;
  uint16_t h = 0;
  if (rows != ATT_ROWS && (rows != 2 * ATT_ROWS || hd > 64)) return 1;
  bool two = rows == 2 * ATT_ROWS;
  if (hd == 32 && two) mode == 2 ? run(flash_bf16in_fwd2_32, h) : mode ? run(flash_bf16_fwd2_32, f) : run(flash_fwd2_32, f);
  else if (hd == 64 && two) mode == 2 ? run(flash_bf16in_fwd2_64, h) : mode ? run(flash_bf16_fwd2_64, f) : run(flash_fwd2_64, f);
  else if (hd == 32) mode == 2 ? run(flash_bf16in_fwd_32, h) : mode ? run(flash_bf16_fwd_32, f) : run(flash_fwd_32, f);
  else if (hd == 64) mode == 2 ? run(flash_bf16in_fwd_64, h) : mode ? run(flash_bf16_fwd_64, f) : run(flash_fwd_64, f);
  else if (hd == 128) mode == 2 ? run(flash_bf16in_fwd_128, h) : mode ? run(flash_bf16_fwd_128, f) : run(flash_fwd_128, f);
  else return 1;
  return 0;
}

extern "C" int emu_flash_bwd(const float* q, const float* k, const float* v, const float* o,
                             const float* dout, const float* lse, float* dvec, float* dq,
                             float* dk, float* dv, const int* dims, const int* ld, float scale,
                             int mode, int rows) {
  int b = dims[0], t = dims[1], heads = dims[2], kvh = dims[3], hd = dims[4];
  if (rows != ATT_ROWS && (rows != 2 * ATT_ROWS || hd > 64)) return 1;
  bool two = rows == 2 * ATT_ROWS;
  // ld: q, k, v, o, dout, dq, dk, dv
  int n = b * t, warps = n * heads;
  std::vector<uint16_t> o16;
  if (mode == 2) o16 = bf16_rows(o, size_t(n - 1) * ld[3] + size_t(heads) * hd);
  emu::launch({unsigned((warps * 32 + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
    if (mode == 2)
      attn_row_dots_h16(dvec, in<uint16_t>(dout), o16.data(), n, t, heads, hd, ld[4], ld[3]);
    else attn_row_dots(dvec, dout, o, n, t, heads, hd, ld[4], ld[3]);
  });
  auto run = [&](auto dq_kernel, auto dkdv_kernel, auto s) {
    using S = decltype(s);
    size_t dq_shared = dq_bytes(hd, mode, rows), dkdv_shared = dkdv_bytes(hd, mode, rows);
    int dkdv_keys = two && mode > 0 ? rows : ATT_ROWS;
    emu::launch(grid(t, b * heads, rows), THREADS, dq_shared, [&] {
      dq_kernel(in<S>(q), in<S>(k), in<S>(v), in<S>(dout), lse, dvec, dq, t, heads, kvh, ld[0],
                ld[1], ld[2], ld[4], ld[5], scale);
    });
    emu::launch(grid(t, b * kvh, dkdv_keys), THREADS, dkdv_shared, [&] {
      dkdv_kernel(in<S>(q), in<S>(k), in<S>(v), in<S>(dout), lse, dvec, dk, dv, t, heads, kvh,
                  ld[0], ld[1], ld[2], ld[4], ld[6], ld[7], scale);
    });
  };
  float f = 0;
  uint16_t h = 0;
  if (hd == 32 && two)
    mode == 2 ? run(flash_bf16in_bwd_dq2_32, flash_bf16in_bwd_dkdv2_32, h)
    : mode    ? run(flash_bf16_bwd_dq2_32, flash_bf16_bwd_dkdv2_32, f)
              : run(flash_bwd_dq2_32, flash_bwd_dkdv_32, f);
  else if (hd == 64 && two)
    mode == 2 ? run(flash_bf16in_bwd_dq2_64, flash_bf16in_bwd_dkdv2_64, h)
    : mode    ? run(flash_bf16_bwd_dq2_64, flash_bf16_bwd_dkdv2_64, f)
              : run(flash_bwd_dq2_64, flash_bwd_dkdv_64, f);
  else if (hd == 32)
    mode == 2 ? run(flash_bf16in_bwd_dq_32, flash_bf16in_bwd_dkdv_32, h)
    : mode    ? run(flash_bf16_bwd_dq_32, flash_bf16_bwd_dkdv_32, f)
              : run(flash_bwd_dq_32, flash_bwd_dkdv_32, f);
  else if (hd == 64)
    mode == 2 ? run(flash_bf16in_bwd_dq_64, flash_bf16in_bwd_dkdv_64, h)
    : mode    ? run(flash_bf16_bwd_dq_64, flash_bf16_bwd_dkdv_64, f)
              : run(flash_bwd_dq_64, flash_bwd_dkdv_64, f);
  else if (hd == 128)
    mode == 2 ? run(flash_bf16in_bwd_dq_128, flash_bf16in_bwd_dkdv_128, h)
    : mode    ? run(flash_bf16_bwd_dq_128, flash_bf16_bwd_dkdv_128, f)
              : run(flash_bwd_dq_128, flash_bwd_dkdv_128, f);
  else return 1;
  return 0;
}

// decode_attention launched as cuda.rs's Gpu::decode_attention launches it: a block of
// DEC_THREADS per (sequence, split, query head), and with splits > 1 decode_combine after it, a
// block per (sequence, query head); table: per sequence its cache's key and value addresses,
// cached length and elements between heads; rope: null, or a [positions, rotated] table;
// strides: q's, k_new's and v_new's head and sequence strides.
extern "C" void emu_decode_attention(float* out, const float* q, const float* k_new,
                                     const float* v_new, const uint64_t* table, const float* rope,
                                     int n, int splits, int heads, int kv_heads, int hd,
                                     int rotated, const int* strides, float scale) {
  std::vector<float> partial(splits > 1 ? size_t(n) * heads * splits * (2 + hd) : 0, NAN);
  float* part = splits > 1 ? partial.data() : nullptr;
  emu::launch({unsigned(n * splits), unsigned(heads), 1}, {DEC_THREADS, 1, 1}, 0, [&] {
    decode_attention(out, part, q, k_new, v_new, table, rope, n, splits, heads, kv_heads, hd,
                     rotated, strides[0], strides[1], strides[2], strides[3], strides[4],
                     strides[5], scale);
  });
  if (splits > 1)
    emu::launch({unsigned(n), unsigned(heads), 1}, {DEC_THREADS, 1, 1}, 0,
                [&] { decode_combine(out, part, n, splits, heads, hd); });
}

// cache_append then extend_attention launched as cuda.rs's Gpu::extend_attention launches them:
// a block of DEC_THREADS per (tile, key/value head), then per (tile, query head); tiles: per
// tile of up to EXT_ROWS new rows of a sequence, its cache's key and value addresses, the
// position of its first row, its rows, its first row's index among the n new rows, and the
// elements between the cache's heads; strides as for emu_decode_attention.
extern "C" void emu_extend_attention(float* out, const float* q, const float* k_new,
                                     const float* v_new, const uint64_t* tiles, const float* rope,
                                     int n_tiles, int heads, int kv_heads, int hd, int rotated,
                                     const int* strides, float scale) {
  emu::launch({unsigned(n_tiles), unsigned(kv_heads), 1}, {DEC_THREADS, 1, 1}, 0, [&] {
    cache_append(k_new, v_new, tiles, rope, n_tiles, kv_heads, hd, rotated, strides[2],
                 strides[3], strides[4], strides[5]);
  });
  emu::launch({unsigned(n_tiles), unsigned(heads), 1}, {DEC_THREADS, 1, 1}, 0, [&] {
    extend_attention(out, q, tiles, rope, n_tiles, heads, kv_heads, hd, rotated, strides[0],
                     strides[1], scale);
  });
}
