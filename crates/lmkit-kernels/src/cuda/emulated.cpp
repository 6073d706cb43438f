// The kernels of train.cu and attention.cu on the CPU (emu.h), launched by name for the
// `cuda-emu` feature's stand-in GPU (cuda/emulated.rs): a test build runs the hand-written GPU
// passes — their buffers, launches and kernels — where there is no GPU.
//
// `lmkit_cuda_emu_launch` takes the arguments as cuda.rs passes them to the driver, each as 64
// bits with a type letter (P pointer, I int, L int64_t, F float), and checks their number and
// types against the kernel's parameters before it runs it, so a wrapper that passes them in the
// wrong order or of the wrong type fails here instead of running with garbage.
#include "emu.h"

#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>

#include "attention.cu"
#include "train.cu"

namespace {

template <class T>
constexpr char letter() {
  if constexpr (std::is_pointer_v<T>) return 'P';
  else if constexpr (std::is_same_v<T, int>) return 'I';
  else if constexpr (std::is_same_v<T, int64_t>) return 'L';
  else if constexpr (std::is_same_v<T, float>) return 'F';
  else static_assert(!sizeof(T), "a kernel parameter type the emulation does not pass");
}

template <class T>
T take(uint64_t bits) {
  if constexpr (std::is_pointer_v<T>) return reinterpret_cast<T>(static_cast<uintptr_t>(bits));
  else if constexpr (std::is_same_v<T, int>) return static_cast<int>(static_cast<int64_t>(bits));
  else if constexpr (std::is_same_v<T, int64_t>) return static_cast<int64_t>(bits);
  else {
    uint32_t low = static_cast<uint32_t>(bits);
    float f;
    std::memcpy(&f, &low, 4);
    return f;
  }
}

using Runner = int (*)(dim3, dim3, size_t, const uint64_t*, const char*, size_t);

// 0, or 2 for a wrong number of arguments, 3 for a wrong type.
template <class... A>
int call(void (*kernel)(A...), dim3 grid, dim3 threads, size_t shared, const uint64_t* args,
         const char* types, size_t count) {
  if (count != sizeof...(A)) return 2;
  constexpr char want[] = {letter<A>()..., 0};
  if (std::memcmp(want, types, count) != 0) return 3;
  [&]<size_t... I>(std::index_sequence<I...>) {
    emu::launch(grid, threads, shared, [&] { kernel(take<A>(args[I])...); });
  }(std::index_sequence_for<A...>{});
  return 0;
}

struct Entry {
  const char* name;
  Runner run;
};

#define K(name)                                                                        \
  Entry {                                                                              \
    #name, [](dim3 g, dim3 b, size_t s, const uint64_t* a, const char* t, size_t n) { \
      return call(name, g, b, s, a, t, n);                                             \
    }                                                                                  \
  }

#define ATT(NAME, HD) K(NAME##_fwd_##HD), K(NAME##_bwd_dq_##HD), K(NAME##_bwd_dkdv_##HD)
#define ATT2(NAME, HD) K(NAME##_fwd2_##HD), K(NAME##_bwd_dq2_##HD)

const Entry KERNELS[] = {
    K(embed_fwd), K(embed_bwd_tokens), K(embed_bwd_positions), K(add_rows),
    K(layer_norm_fwd), K(layer_norm_bwd), K(gather_rows), K(rms_norm_fwd), K(rms_norm_bwd),
    K(rope_rows), K(rope_rows_h16), K(rope_rows_bf16), K(swiglu_fwd), K(swiglu_bwd), K(swiglu_bwd_bf16),
    K(swiglu_bwd_h16), K(gelu_fwd), K(gelu_bwd), K(gelu_bwd_h16), K(relu_fwd),
    K(relu_bwd), K(softmax_causal_fwd), K(softmax_causal_bwd), K(cross_entropy), K(cross_entropy_bf16),
    K(column_sums), K(column_sums_v4), K(column_sums_h16), K(column_sums_h16_v8),
    K(norm_weight_sums), K(norm_weight_sums_v4), K(fill), K(adam_chunks), K(sum_squares_chunks), K(attn_row_dots),
    K(attn_row_dots_h16),
    K(layer_norm_fwd_bf16), K(rms_norm_fwd_bf16), K(swiglu_fwd_bf16), K(swiglu_fwd_h16), K(gelu_fwd_bf16),
    K(relu_fwd_bf16), K(to_bf16), K(from_bf16), K(decode_attention), K(decode_combine), K(cache_append),
    K(extend_attention), K(decode_attention_bf16), K(decode_combine_bf16), K(cache_append_bf16),
    K(extend_attention_bf16),
    ATT(flash, 32), ATT(flash, 64), ATT(flash, 128), ATT(flash_bf16, 32), ATT(flash_bf16, 64),
    ATT(flash_bf16, 128), ATT(flash_bf16in, 32), ATT(flash_bf16in, 64), ATT(flash_bf16in, 128),
    ATT2(flash, 32), ATT2(flash, 64), ATT2(flash_bf16, 32), ATT2(flash_bf16, 64),
    ATT2(flash_bf16in, 32), ATT2(flash_bf16in, 64), K(flash_bf16_bwd_dkdv2_32),
    K(flash_bf16_bwd_dkdv2_64), K(flash_bf16in_bwd_dkdv2_32), K(flash_bf16in_bwd_dkdv2_64),
};

}  // namespace

// Runs kernel `name` on a grid of (gx, gy) blocks of `threads` threads with `shared` bytes of
// dynamic shared memory; one launch at a time (the emulation's grid and shared memory are
// process-wide). 0, or 1 for an unknown kernel, 2 for a wrong number of arguments, 3 for an
// argument of the wrong type.
extern "C" int lmkit_cuda_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned threads,
                                     size_t shared, const uint64_t* args, const char* types,
                                     size_t count) {
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  for (const Entry& e : KERNELS)
    if (std::strcmp(e.name, name) == 0)
      return e.run({gx, gy, 1}, {threads, 1, 1}, shared, args, types, count);
  return 1;
}
