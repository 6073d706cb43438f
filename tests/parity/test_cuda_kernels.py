"""The CUDA kernels of the GPU training passes (crates/lmkit-kernels/src/cuda/*.cu) against PyTorch,
run on the CPU: the kernel source compiles against crates/lmkit-kernels/src/cuda/emu.h, which runs
each block's threads on one OS thread, a warp at a time as far as it can go between two
__syncthreads, and the tensor-core tiles as TF32 or bf16 products. Their results here are what the GPU computes up to
the order of additions, so a wrong mask, index, tile boundary or missing synchronisation shows
without a GPU (the whole passes on the emulated GPU: the cuda-emu tests scripts/test.sh runs; on
a GPU: the cuda tests of lmkit-kernels and lmkit-train, through bench/gpu_check.sh)."""
import ctypes
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
F32 = ctypes.POINTER(ctypes.c_float)
INTS = ctypes.POINTER(ctypes.c_int)


def build(tmp_path_factory, name):
    cxx = shutil.which("g++")
    assert cxx, "g++ is needed (build-essential; scripts/setup-system.sh installs it)"
    lib = tmp_path_factory.mktemp("cuda_emu") / f"{name}.so"
    p = subprocess.run([cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                        "-o", str(lib), str(ROOT / f"tests/cuda_emu/{name}.cpp")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    so = build(tmp_path_factory, "attention_emu")
    so.emu_flash_fwd.argtypes = [F32] * 5 + [INTS, INTS, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    so.emu_flash_bwd.argtypes = [F32] * 10 + [INTS, INTS, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    so.emu_decode_attention.argtypes = ([F32] * 4 + [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 6
                                        + [INTS, ctypes.c_float])
    so.emu_extend_attention.argtypes = ([F32] * 4 + [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 5
                                        + [INTS, ctypes.c_float])
    return so


@pytest.fixture(scope="module")
def train_kernels(tmp_path_factory):
    so = build(tmp_path_factory, "train_emu")
    i, f, l, u = ctypes.c_int, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    so.emu_gather_rows.argtypes = [F32, F32, u, i, i]
    so.emu_rms_norm_fwd.argtypes = [F32, F32, F32, F32, i, i, f]
    so.emu_rms_norm_bwd.argtypes = [F32, F32, F32, F32, F32, i, i, i]
    so.emu_rope_rows.argtypes = [F32, F32, i, i, i, i, i, f]
    so.emu_swiglu_fwd.argtypes = [F32, F32, F32, l, i, l]
    so.emu_swiglu_bwd.argtypes = [F32, F32, F32, l, i, l]
    so.emu_cross_entropy.argtypes = [F32, F32, u, i, i, f]
    so.emu_cross_entropy_bf16.argtypes = [u, F32, u, i, i, f]
    so.emu_column_sums.argtypes = [F32, F32, i, i, i, i, i]
    so.emu_column_sums_h16.argtypes = [F32, u, i, i, i, i, i]
    so.emu_layer_norm_fwd.argtypes = [F32] * 6 + [i, i, f]
    so.emu_layer_norm_bwd.argtypes = [F32] * 6 + [i, i, i]
    so.emu_norm_weight_sums.argtypes = [u] * 6 + [i, i, i, i, i]
    so.emu_layer_norm_fwd_bf16.argtypes = [u] + [F32] * 5 + [i, i, f]
    so.emu_rms_norm_fwd_bf16.argtypes = [u, F32, F32, F32, i, i, f]
    so.emu_swiglu_fwd_bf16.argtypes = [u, F32, F32, l, i, l]
    so.emu_act_fwd.argtypes = [i, i, u, F32, l]
    so.emu_to_bf16.argtypes = [u, F32, l]
    so.emu_softmax_causal.argtypes = [F32, l, i, f, F32, i]
    so.emu_embed.argtypes = [F32, F32, F32, u, i, i, i, F32, F32, F32]
    ptrs, lens = ctypes.POINTER(F32), ctypes.POINTER(l)
    so.emu_adamw.argtypes = [i] + [ptrs] * 4 + [lens, F32, l] + [f] * 7
    so.emu_sum_squares.argtypes = [i, ptrs, lens, l]
    so.emu_sum_squares.restype = ctypes.c_double
    return so


def ptr(a):
    assert a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    return a.ctypes.data_as(F32)


def ints(*xs):
    return (ctypes.c_int * len(xs))(*xs)


def reference(q, k, v, dout, heads, kv_heads, scale):
    """Causal attention in float64 by PyTorch's autograd: (o, lse, dq, dk, dv), each [b, t, h, hd]
    (lse [b, heads, t])."""
    q, k, v = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    group = heads // kv_heads
    kk = k.repeat_interleave(group, dim=2)
    vv = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    t = s.shape[-1]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, dim=-1), vv)
    o.backward(torch.tensor(dout, dtype=torch.float64))
    return o.detach().numpy(), lse.detach().numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy()


def close(got, want, what, tol, floor=1e-30):
    """The largest error relative to the largest reference value (at least `floor`: a gradient
    that is 0, as dq and dk of a single token, is checked against the inputs' scale)."""
    err = np.abs(got - want).max() / max(np.abs(want).max(), floor)
    assert err < tol, f"{what}: max error {err:.2e} of the largest value (tolerance {tol})"


SHAPES = [
    (2, 77, 4, 4, 64, True),    # GPT-2's packed q|k|v, t across two 64-row tiles
    (1, 150, 4, 2, 64, False),  # grouped-query heads, three tiles
    (2, 33, 2, 1, 32, False),   # multi-query, one partial tile
    (1, 70, 2, 2, 128, True),   # head size 128: tiles of 32 keys/queries (TF32; bf16: 32 queries)
    (3, 1, 2, 1, 64, False),    # one token
    (1, 97, 3, 1, 128, False),  # three query heads per key/value head, head size 128
]


def bf16_bits(x):
    """PyTorch's rounding of f32 `x` to bf16 (to nearest, ties to even), as uint16 bits."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


# 0: TF32; 1: bf16 products on f32 inputs (rounded as the tiles load); 2: bf16 inputs (q, k, v
# and dO rounded to bf16 beforehand, tiles copied by cp.async with the next one in flight).
MODES = {"tf32": 0, "bf16": 1, "bf16in": 2}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("b,t,heads,kv_heads,hd,packed,rows",
                         [s + (64,) for s in SHAPES] + [s + (128,) for s in SHAPES if s[4] <= 64])
def test_flash_attention_equals_pytorch(kernels, b, t, heads, kv_heads, hd, packed, rows, mode):
    """The kernels against PyTorch; `rows`: the forward and dQ kernels' rows per block, and with
    bf16 products the dK/dV kernel's keys (64, or 128 with two blocks of 16 a warp: head sizes 32
    and 64, as cuda.rs chooses with LMKIT_CUDA_FLASH_ROWS)."""
    bf16 = mode > 0
    rng = np.random.default_rng(hd + t)
    scale = 1.0 / np.sqrt(hd)
    c, ckv = heads * hd, kv_heads * hd
    # q|k|v side by side in one [b·t, c + 2·ckv] matrix (GPT-2's c_attn output), or three buffers.
    if packed:
        qkv = rng.standard_normal((b * t, c + 2 * ckv), dtype=np.float32)
        # pointers at column offsets of the one matrix, as the GPU pass passes them
        q_ptr, k_ptr, v_ptr = (ctypes.cast(ptr(qkv), ctypes.c_void_p).value + 4 * off for off in (0, c, c + ckv))
        q_ptr, k_ptr, v_ptr = (ctypes.cast(p, F32) for p in (q_ptr, k_ptr, v_ptr))
        lds = (c + 2 * ckv,) * 3
        qn, kn, vn = qkv[:, :c], qkv[:, c:c + ckv], qkv[:, c + ckv:]
    else:
        qn = rng.standard_normal((b * t, c), dtype=np.float32)
        kn = rng.standard_normal((b * t, ckv), dtype=np.float32)
        vn = rng.standard_normal((b * t, ckv), dtype=np.float32)
        q_ptr, k_ptr, v_ptr = ptr(qn), ptr(kn), ptr(vn)
        lds = (c, ckv, ckv)
    dout = rng.standard_normal((b * t, c), dtype=np.float32)
    dout_ptr = ptr(dout)
    if mode == 2:
        # The kernels read bf16 bits: the same matrices rounded (the reference keeps f32 inputs).
        def bits_at(a, off):
            return ctypes.cast(a.ctypes.data + 2 * off, F32)
        if packed:
            qkv16 = bf16_bits(qkv)
            q_ptr, k_ptr, v_ptr = (bits_at(qkv16, off) for off in (0, c, c + ckv))
            keep = [qkv16]
        else:
            keep = [bf16_bits(x) for x in (qn, kn, vn)]
            q_ptr, k_ptr, v_ptr = (bits_at(x, 0) for x in keep)
        dout16 = bf16_bits(dout)
        dout_ptr = bits_at(dout16, 0)
    o = np.full((b * t, c), np.nan, dtype=np.float32)
    lse = np.full((b, heads, t), np.nan, dtype=np.float32)
    dims = ints(b, t, heads, kv_heads, hd)
    assert kernels.emu_flash_fwd(q_ptr, k_ptr, v_ptr, ptr(o), ptr(lse), dims, ints(*lds, c), scale, mode, rows) == 0
    dvec = np.full((b, heads, t), np.nan, dtype=np.float32)
    dq = np.full((b * t, c), np.nan, dtype=np.float32)
    dk = np.full((b * t, ckv), np.nan, dtype=np.float32)
    dv = np.full((b * t, ckv), np.nan, dtype=np.float32)
    assert kernels.emu_flash_bwd(q_ptr, k_ptr, v_ptr, ptr(o), dout_ptr, ptr(lse), ptr(dvec), ptr(dq), ptr(dk),
                                 ptr(dv), dims, ints(*lds, c, c, c, ckv, ckv), scale, mode, rows) == 0

    shape = lambda x, h: x.reshape(b, t, h, hd)  # noqa: E731
    want = reference(shape(qn, heads), shape(kn, kv_heads), shape(vn, kv_heads), shape(dout, heads),
                     heads, kv_heads, scale)
    # TF32 products (10-bit mantissas) with f32 sums: errors of a few 1e-4 of the largest value;
    # bf16 operands (7-bit mantissas: q, k, v, dO and the probabilities rounded to 2^-9): ~1e-2.
    tol = 1.5e-2 if bf16 else 3e-3
    # Inputs are standard normal: values and gradients of order 1.
    close(shape(o, heads), want[0], "output", tol, 1.0)
    close(lse, want[1], "log-sum-exp", 1e-2 if bf16 else 1e-3, 1.0)
    close(shape(dq, heads), want[2], "dq", tol, 1.0)
    close(shape(dk, kv_heads), want[3], "dk", tol, 1.0)
    close(shape(dv, kv_heads), want[4], "dv", tol, 1.0)


@pytest.mark.parametrize("heads,kv_heads,hd,lens,rotated,splits", [
    (6, 2, 64, [0, 5, 130, 300], 64, 1),  # grouped-query heads; only the new key; over two tiles; rope
    (4, 4, 80, [127, 1, 256], 0, 1),      # a head size that does not divide the block
    (2, 1, 200, [3, 129], 100, 1),        # two columns a thread; half of each head rotated
    (2, 1, 64, [700, 3], 64, 3),          # keys split over 3 blocks (the short sequence's 2 without keys)
    (4, 2, 200, [400], 100, 2),           # split, two columns a thread
])
def test_decode_attention_equals_pytorch_sdpa(kernels, heads, kv_heads, hd, lens, rotated, splits):
    """One decoding step of several sequences, each over its own KV cache plus its new key and
    value (decode_attention: one launch, and decode_combine after it where the keys are split
    over several blocks), against PyTorch (check_cache_attention)."""
    check_cache_attention(kernels, heads, kv_heads, hd, [(length, 1) for length in lens], rotated, splits)


@pytest.mark.parametrize("heads,kv_heads,hd,seqs,rotated", [
    (6, 2, 64, [(0, 7), (5, 1), (130, 33), (0, 16)], 64),  # fresh prompts, a step, 3 tiles of rows
    (4, 4, 80, [(17, 2), (0, 40)], 0),                     # a head size that does not divide the block
    (2, 1, 256, [(31, 5), (1, 20)], 100),                  # the largest head; half of each head rotated
])
def test_extend_attention_equals_pytorch_sdpa(kernels, heads, kv_heads, hd, seqs, rotated):
    """Prompt pieces beside decoding steps, each sequence continuing its own KV cache by its new
    positions (cache_append, then extend_attention, a block per 16 rows of a sequence), against
    PyTorch (check_cache_attention)."""
    check_cache_attention(kernels, heads, kv_heads, hd, seqs, rotated)


def check_cache_attention(kernels, heads, kv_heads, hd, seqs, rotated, splits=1):
    """Sequences of (cached positions, new positions), each continuing its own KV cache, against
    PyTorch's scaled_dot_product_attention in float64 with a causal mask over the cache and the
    new positions, q and the new keys rotated first as transformers' apply_rotary_pos_emb does
    (rotate_half over the first `rotated` columns) at their positions; q, k and v read in place
    from one row of projections per new position. The kernels also write the new keys (rotated)
    and values into each cache from its length and nothing else."""
    rng = np.random.default_rng(hd)
    n, scale, half = sum(new for _, new in seqs), 1.0 / np.sqrt(hd), rotated // 2
    width = (heads + 2 * kv_heads) * hd
    qkv = rng.standard_normal((n, width), dtype=np.float32)
    q = qkv[:, :heads * hd].reshape(n, heads, hd).transpose(1, 0, 2)
    k_new = qkv[:, heads * hd:(heads + kv_heads) * hd].reshape(n, kv_heads, hd).transpose(1, 0, 2)
    v_new = qkv[:, (heads + kv_heads) * hd:].reshape(n, kv_heads, hd).transpose(1, 0, 2)
    at = ctypes.cast(ptr(qkv), ctypes.c_void_p).value
    q_ptr, k_ptr, v_ptr = (ctypes.cast(at + 4 * off, F32) for off in (0, heads * hd, (heads + kv_heads) * hd))
    strides = ints(hd, width, hd, width, hd, width)  # head and sequence strides of q, k, v
    theta = np.arange(max(a + b for a, b in seqs) + 1)[:, None] * 10000.0 ** (-np.arange(0, max(rotated, 2), 2) / max(rotated, 2))[None, :]
    table = np.concatenate([np.cos(theta[:, :half]), np.sin(theta[:, :half])], 1).astype(np.float32)
    caps = [length + new + 3 for length, new in seqs]
    ks = [rng.standard_normal((kv_heads, cap, hd), dtype=np.float32) for cap in caps]
    vs = [rng.standard_normal((kv_heads, cap, hd), dtype=np.float32) for cap in caps]
    before = [(k.copy(), v.copy()) for k, v in zip(ks, vs)]
    out = np.full((n, heads, hd), np.nan, dtype=np.float32)
    rope = table.ctypes.data if rotated else None
    if all(new == 1 for _, new in seqs):
        cache_table = np.array([[k.ctypes.data, v.ctypes.data, length, cap * hd]
                                for k, v, (length, _), cap in zip(ks, vs, seqs, caps)], dtype=np.uint64)
        kernels.emu_decode_attention(ptr(out), q_ptr, k_ptr, v_ptr, cache_table.ctypes.data, rope, n, splits,
                                     heads, kv_heads, hd, rotated, strides, scale)
    else:
        # Tiles of up to 16 new rows of a sequence, as cuda.rs's Gpu::extend_attention makes them.
        tiles, row = [], 0
        for k, v, (length, new), cap in zip(ks, vs, seqs, caps):
            for r0 in range(0, new, 16):
                tiles.append([k.ctypes.data, v.ctypes.data, length + r0, min(16, new - r0), row + r0, cap * hd])
            row += new
        tiles = np.array(tiles, dtype=np.uint64)
        kernels.emu_extend_attention(ptr(out), q_ptr, k_ptr, v_ptr, tiles.ctypes.data, rope, len(tiles), heads,
                                     kv_heads, hd, rotated, strides, scale)

    def rotate(x, pos):
        """transformers' apply_rotary_pos_emb on the first `rotated` columns at positions pos, pos + 1, ...
        (x [heads, t, hd]): x·cos + rotate_half(x)·sin."""
        if not rotated:
            return x
        at = theta[pos:pos + x.shape[1], :half]
        cos = torch.cat([f64(np.cos(at))] * 2, -1)
        sin = torch.cat([f64(np.sin(at))] * 2, -1)
        r = x[..., :rotated]
        turned = r * cos + torch.cat([-r[..., half:], r[..., :half]], -1) * sin
        return torch.cat([turned, x[..., rotated:]], -1)

    col = 0
    for i, (length, new) in enumerate(seqs):
        k0, v0 = before[i]
        cols = slice(col, col + new)
        new_k = rotate(f64(k_new[:, cols]), length)
        keys = torch.cat([f64(k0[:, :length]), new_k], 1)
        vals = f64(np.concatenate([v0[:, :length], v_new[:, cols]], 1))
        # Row r (position length + r) sees keys 0..=length + r.
        mask = torch.arange(length + new)[None, :] <= length + torch.arange(new)[:, None]
        want = torch.nn.functional.scaled_dot_product_attention(
            rotate(f64(q[:, cols]), length)[None], keys[None], vals[None], attn_mask=mask, scale=scale,
            enable_gqa=True)[0]
        close(out[cols].transpose(1, 0, 2), want.numpy(), f"sequence {i} ({length} + {new})", 1e-5, 1.0)
        written = slice(length, length + new)
        close(ks[i][:, written], new_k.numpy(), f"sequence {i}'s keys in the cache", 1e-6, 1.0)
        assert np.array_equal(vs[i][:, written], v_new[:, cols]), f"sequence {i}'s values in the cache"
        for now, was in ((ks[i], k0), (vs[i], v0)):
            kept = np.r_[0:length, length + new:now.shape[1]]
            assert np.array_equal(now[:, kept], was[:, kept]), \
                f"sequence {i}: cache written outside positions {length}..{length + new}"
        col += new


def f64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def test_rms_norm_equals_pytorch(train_kernels):
    rng = np.random.default_rng(1)
    n, c, eps = 37, 72, 1e-5
    x = rng.standard_normal((n, c), dtype=np.float32)
    w = rng.standard_normal(c, dtype=np.float32)
    dy = rng.standard_normal((n, c), dtype=np.float32)
    out, rstd = np.full((n, c), np.nan, np.float32), np.full(n, np.nan, np.float32)
    train_kernels.emu_rms_norm_fwd(ptr(out), ptr(rstd), ptr(x), ptr(w), n, c, eps)
    xt, wt = f64(x, True), f64(w, True)
    want = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps) * wt
    want.backward(f64(dy))
    close(out, want.detach().numpy(), "rms norm", 1e-5)
    # The backward pass: dx added to what dx held (accumulate = 1); dw from norm_weight_sums.
    dx0 = rng.standard_normal((n, c), dtype=np.float32)
    dx = dx0.copy()
    train_kernels.emu_rms_norm_bwd(ptr(dx), ptr(dy), ptr(x), ptr(w), ptr(rstd), n, c, 1)
    close(dx - dx0, xt.grad.numpy(), "rms norm dx", 1e-5)
    dw, _ = norm_weight_sums(train_kernels, dy, x, None, rstd)
    close(dw, wt.grad.numpy(), "rms norm dw", 1e-5)


def norm_weight_sums(kernels, dy, x, mean, rstd, vec=1):
    """`Gpu::norm_weight_grads`: norm_weight_sums into rows of partial sums (chunks of at least
    128 rows, at most 128 chunks; `vec` columns a lane: 1, or 4 with dy and x 16-byte aligned),
    those rows summed in f64 here; (dw, db), db None without a mean (RMSNorm)."""
    n, c = dy.shape
    chunks, per = row_chunks(n)
    dw = np.full((chunks, c), np.nan, np.float32)
    db = np.full((chunks, c), np.nan, np.float32) if mean is not None else None
    if vec > 1:
        dy, x = aligned(dy), aligned(x)
    addr = lambda a: None if a is None else a.ctypes.data
    kernels.emu_norm_weight_sums(addr(dw), addr(db), addr(dy), addr(x), addr(mean), addr(rstd),
                                 n, c, per, chunks, vec)
    return dw.astype(np.float64).sum(0), None if db is None else db.astype(np.float64).sum(0)


def aligned(a):
    """A copy of `a` whose data starts 16-byte aligned (as the GPU's allocations do), for the
    kernels that read 16 bytes a lane."""
    raw = np.empty(a.nbytes + 16, np.uint8)
    skip = -raw.ctypes.data % 16
    out = raw[skip:skip + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_rope_equals_the_rotate_half_definition_and_its_gradient(train_kernels):
    rng = np.random.default_rng(2)
    b, t, hd, heads, extra = 2, 9, 16, 3, 5  # 3 rotated heads, then 5 columns left alone
    ld = heads * hd + extra
    n = b * t
    theta = np.arange(t)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)[None, :]
    table = np.concatenate([np.cos(theta), np.sin(theta)], 1).astype(np.float32)  # [t, hd]
    x = rng.standard_normal((n, ld), dtype=np.float32)
    g = rng.standard_normal((n, heads * hd), dtype=np.float32)
    got = x.copy()
    train_kernels.emu_rope_rows(ptr(got), ptr(table), n, ld, t, heads, hd, 1.0)
    # transformers' apply_rotary_pos_emb: x·cos + rotate_half(x)·sin, cos/sin repeated per half
    xt = f64(x[:, :heads * hd].reshape(b, t, heads, hd), True)
    cos = f64(np.concatenate([np.cos(theta)] * 2, 1))[None, :, None, :]
    sin = f64(np.concatenate([np.sin(theta)] * 2, 1))[None, :, None, :]
    rot = torch.cat([-xt[..., hd // 2:], xt[..., :hd // 2]], -1)
    want = xt * cos + rot * sin
    want.backward(f64(g.reshape(b, t, heads, hd)))
    close(got[:, :heads * hd], want.detach().numpy().reshape(n, -1), "rope", 1e-6)
    assert np.array_equal(got[:, heads * hd:], x[:, heads * hd:]), "columns past the heads changed"
    # The backward pass rotates the gradient by −θ.
    dg = np.concatenate([g, np.zeros((n, extra), np.float32)], 1)
    train_kernels.emu_rope_rows(ptr(dg), ptr(table), n, ld, t, heads, hd, -1.0)
    close(dg[:, :heads * hd], xt.grad.numpy().reshape(n, -1), "rope backward", 1e-6)


def test_swiglu_equals_pytorch(train_kernels):
    """Separate gate and up, and the halves of one stacked gate|up (each row gate's, then up's)
    read and written in place."""
    rng = np.random.default_rng(3)
    rows, cols = 13, 300
    gate, up, dg = (rng.standard_normal((rows, cols), dtype=np.float32) * 3 for _ in range(3))
    gt, ut = f64(gate, True), f64(up, True)
    want = torch.nn.functional.silu(gt) * ut
    want.backward(f64(dg))
    g = np.full((rows, cols), np.nan, np.float32)
    train_kernels.emu_swiglu_fwd(ptr(g), ptr(gate), ptr(up), rows, cols, cols)
    close(g, want.detach().numpy(), "swiglu", 1e-6)
    dgate, dup = gate.copy(), up.copy()
    train_kernels.emu_swiglu_bwd(ptr(dgate), ptr(dup), ptr(dg), rows, cols, cols)
    close(dgate, gt.grad.numpy(), "swiglu dgate", 1e-6)
    close(dup, ut.grad.numpy(), "swiglu dup", 1e-6)
    both = np.ascontiguousarray(np.concatenate([gate, up], 1))
    halves = ptr(both), ctypes.cast(both.ctypes.data + 4 * cols, F32)
    g = np.full((rows, cols), np.nan, np.float32)
    train_kernels.emu_swiglu_fwd(ptr(g), *halves, rows, cols, 2 * cols)
    close(g, want.detach().numpy(), "swiglu of the halves", 1e-6)
    train_kernels.emu_swiglu_bwd(*halves, ptr(dg), rows, cols, 2 * cols)
    close(both[:, :cols], gt.grad.numpy(), "swiglu dgate in the halves", 1e-6)
    close(both[:, cols:], ut.grad.numpy(), "swiglu dup in the halves", 1e-6)


def test_gather_rows_and_cross_entropy_equal_pytorch(train_kernels):
    rng = np.random.default_rng(4)
    vocab, c, rows = 50, 24, 7
    table = rng.standard_normal((vocab, c), dtype=np.float32)
    ids = rng.integers(0, vocab, rows).astype(np.uint32)
    out = np.full((rows, c), np.nan, np.float32)
    train_kernels.emu_gather_rows(ptr(out), ptr(table), ids.ctypes.data, rows, c)
    assert np.array_equal(out, table[ids])
    v, sc = 3001, 0.25  # a row longer than the block of 1024 threads
    logits = rng.standard_normal((rows, v), dtype=np.float32) * 4
    targets = rng.integers(0, v, rows).astype(np.uint32)
    loss = np.full(rows, np.nan, np.float32)
    grad = logits.copy()
    train_kernels.emu_cross_entropy(ptr(grad), ptr(loss), targets.ctypes.data, rows, v, sc)
    lt = f64(logits, True)
    want = torch.nn.functional.cross_entropy(lt, torch.tensor(targets.astype(np.int64)), reduction="none")
    (want.sum() * sc).backward()
    close(loss, want.detach().numpy(), "cross-entropy", 1e-5)
    close(grad, lt.grad.numpy(), "cross-entropy gradient", 1e-5)
    # bf16 logits (autocast's output layer makes them so): PyTorch's cross-entropy of their
    # values in f32, its gradient rounded to bf16 (within one bf16 step: exp and the sums in
    # another order).
    l16 = bf16_bits(logits)
    loss16 = np.full(rows, np.nan, np.float32)
    train_kernels.emu_cross_entropy_bf16(ctypes.c_void_p(l16.ctypes.data), ptr(loss16),
                                         targets.ctypes.data, rows, v, sc)
    lb = torch.from_numpy(bf16_bits(logits).view(np.int16)).view(torch.bfloat16).float().requires_grad_()
    want = torch.nn.functional.cross_entropy(lb, torch.tensor(targets.astype(np.int64)), reduction="none")
    (want.sum() * sc).backward()
    close(loss16, want.detach().numpy(), "bf16 cross-entropy", 1e-5)
    got = torch.from_numpy(l16.view(np.int16)).view(torch.bfloat16).float().numpy()
    want_grad = lb.grad.numpy()
    step = np.abs(want_grad) * 2.0**-7 + 1e-12
    assert (np.abs(got - want_grad) <= step).all(), "bf16 cross-entropy gradient"
    same = (l16 == bf16_bits(want_grad)).mean()
    assert same > 0.99, f"bf16 cross-entropy gradient: {same:.4f} of the elements rounded as PyTorch's"


def test_layer_norm_equals_pytorch(train_kernels):
    rng = np.random.default_rng(5)
    n, c, eps = 21, 80, 1e-5
    x = rng.standard_normal((n, c), dtype=np.float32) * 2 + 1
    w, b = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
    dy = rng.standard_normal((n, c), dtype=np.float32)
    out, mean, rstd = np.full((n, c), np.nan, np.float32), np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    train_kernels.emu_layer_norm_fwd(ptr(out), ptr(mean), ptr(rstd), ptr(x), ptr(w), ptr(b), n, c, eps)
    xt, wt, bt = f64(x, True), f64(w, True), f64(b, True)
    want = torch.nn.functional.layer_norm(xt, (c,), wt, bt, eps)
    want.backward(f64(dy))
    close(out, want.detach().numpy(), "layer norm", 1e-5)
    dx = np.full((n, c), np.nan, np.float32)
    train_kernels.emu_layer_norm_bwd(ptr(dx), ptr(dy), ptr(x), ptr(w), ptr(mean), ptr(rstd), n, c, 0)
    close(dx, xt.grad.numpy(), "layer norm dx", 1e-5)
    dw, db = norm_weight_sums(train_kernels, dy, x, mean, rstd)
    close(dw, wt.grad.numpy(), "layer norm dw", 1e-5)
    close(db, bt.grad.numpy(), "layer norm db", 1e-5)


@pytest.mark.parametrize("vec", [1, 4])
def test_norm_weight_sums_over_chunks_of_rows(train_kernels, vec):
    """The norms' weight and bias gradients over many rows (several chunks, a partial block of
    columns): each chunk's partial sums of dy·x̂ and dy, with x̂ from the kept mean and 1/std
    (LayerNorm) or 1/rms alone (RMSNorm); one column a lane, or four."""
    rng = np.random.default_rng(12)
    n, c = 1300, 40
    x = rng.standard_normal((n, c), dtype=np.float32) * 2 + 1
    dy = rng.standard_normal((n, c), dtype=np.float32)
    mean = x.mean(1).astype(np.float32)
    rstd = (1 / np.sqrt(x.var(1) + 1e-5)).astype(np.float32)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    xh = (x64 - mean[:, None]) * rstd[:, None]
    dw, db = norm_weight_sums(train_kernels, dy, x, mean, rstd, vec)
    close(dw, (dy64 * xh).sum(0), "layer norm dw over chunks", 1e-5)
    close(db, dy64.sum(0), "layer norm db over chunks", 1e-5)
    dw, db = norm_weight_sums(train_kernels, dy, x, None, rstd, vec)
    assert db is None
    close(dw, (dy64 * x64 * rstd[:, None]).sum(0), "rms norm dw over chunks", 1e-5)


def test_bf16_outputs_equal_pytorch_rounding(train_kernels):
    """With bf16 products the norms and activations write their outputs as bf16 (the products'
    operands) and `to_bf16` rounds the rest: each equals PyTorch's rounding of the f32 kernel's
    output, bit for bit; the tanh GELU's f32 kernel is checked against PyTorch too."""
    rng = np.random.default_rng(11)
    n, c, eps = 19, 72, 1e-5
    x = rng.standard_normal((n, c), dtype=np.float32) * 3
    w, b = rng.standard_normal(c, dtype=np.float32), rng.standard_normal(c, dtype=np.float32)
    up = rng.standard_normal((n, c), dtype=np.float32)
    vp = ctypes.c_void_p
    special = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, np.nan, np.inf,
                        -np.inf, np.finfo(np.float32).max, 1e-40, 0.0, -0.0, 3.0e38], np.float32)
    for data in (x.ravel(), special):
        got = np.zeros(data.size, np.uint16)
        train_kernels.emu_to_bf16(vp(got.ctypes.data), ptr(data), data.size)
        want = bf16_bits(data)
        nan = np.isnan(data)
        assert (got[~nan] == want[~nan]).all(), (data[got != want], got[got != want], want[got != want])
        assert ((got[nan] & 0x7fff) > 0x7f80).all(), "NaN stays NaN"

    def both(run, f32_out):
        """`run(out, bf16)` into f32, then bf16 elements: the bf16 ones equal PyTorch's rounding."""
        run(f32_out.ctypes.data, 0)
        h = np.zeros(f32_out.shape, np.uint16)
        run(h.ctypes.data, 1)
        assert (h == bf16_bits(f32_out)).all()
        return f32_out

    stats = np.full(2 * n, np.nan, np.float32)
    m, r = ptr(stats), ptr(stats[n:])

    def layer_norm(out, bf16):
        f = train_kernels.emu_layer_norm_fwd_bf16 if bf16 else train_kernels.emu_layer_norm_fwd
        f(vp(out) if bf16 else ctypes.cast(out, F32), m, r, ptr(x), ptr(w), ptr(b), n, c, eps)

    got = both(layer_norm, np.full((n, c), np.nan, np.float32))
    want = torch.nn.functional.layer_norm(f64(x), (c,), f64(w), f64(b), eps)
    close(got, want.numpy(), "layer norm", 1e-5)

    def rms_norm(out, bf16):
        f = train_kernels.emu_rms_norm_fwd_bf16 if bf16 else train_kernels.emu_rms_norm_fwd
        f(vp(out) if bf16 else ctypes.cast(out, F32), r, ptr(x), ptr(w), n, c, eps)

    both(rms_norm, np.full((n, c), np.nan, np.float32))

    def swiglu(out, bf16):
        f = train_kernels.emu_swiglu_fwd_bf16 if bf16 else train_kernels.emu_swiglu_fwd
        f(vp(out) if bf16 else ctypes.cast(out, F32), ptr(x), ptr(up), n, c, c)

    both(swiglu, np.full((n, c), np.nan, np.float32))
    for gelu in (1, 0):
        got = both(lambda out, bf16: train_kernels.emu_act_fwd(gelu, bf16, vp(out), ptr(x), x.size),
                   np.full((n, c), np.nan, np.float32))
        if gelu:
            want = torch.nn.functional.gelu(f64(x), approximate="tanh").numpy()
        else:
            want = np.maximum(x, 0)
        close(got, want, "gelu" if gelu else "relu", 1e-6)


def row_chunks(n):
    """How `Gpu::column_sums` and `Gpu::norm_weight_grads` split n rows (`row_chunks` in
    crates/lmkit-kernels/src/cuda.rs): (chunks, rows per chunk), chunks of at least 128 rows, at
    most 128 of them."""
    chunks = min(max(-(-n // 128), 1), 128)
    return chunks, -(-n // chunks)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_column_sums_equal_numpy(train_kernels, bf16, wide):
    """The bias and norm-weight gradients' column sums, of f32 rows or bf16 rows (the GELU
    gradient's), one column a lane or (`wide`, 16-byte aligned rows) 16 bytes a lane: a partial
    block of columns, fewer rows than the kernel's 8 row groups, and many rows, as
    `Gpu::column_sums` launches it: chunks of at least 128 rows summed apart into rows of
    partial sums (f32), then those rows summed."""
    rng = np.random.default_rng(8)
    shapes = [(1000, 70), (5, 33), (1, 1), (300, 64), (20000, 40)]
    if wide:
        shapes = [(1000, 72), (5, 8), (1, 8), (300, 64), (20000, 40), (40, 520)]
    for n, cols in shapes:
        src = aligned(rng.standard_normal((n, cols), dtype=np.float32))
        vec = (8 if bf16 else 4) if wide else 1
        if bf16:
            bits = aligned(bf16_bits(src))
            src = (bits.astype(np.uint32) << 16).view(np.float32)

            def first(out, n, per, chunks):
                train_kernels.emu_column_sums_h16(ptr(out), bits.ctypes.data, n, cols, per, chunks, vec)
        else:
            def first(out, n, per, chunks):
                train_kernels.emu_column_sums(ptr(out), ptr(src), n, cols, per, chunks, vec)
        out = np.full(cols, np.nan, np.float32)
        chunks, per = row_chunks(n)
        if chunks == 1:
            first(out, n, n, 1)
        else:
            partial = aligned(np.full((chunks, cols), np.nan, np.float32))
            first(partial, n, per, chunks)
            ends = [min(n, (c + 1) * per) for c in range(chunks)]
            want = [src[c * per:ends[c]].astype(np.float64).sum(0) for c in range(chunks)]
            close(partial, np.array(want), f"partial column sums of {n} x {cols}", 1e-5)
            train_kernels.emu_column_sums(ptr(out), ptr(partial), chunks, cols, chunks, 1,
                                          4 if wide and cols % 4 == 0 else 1)
        close(out, src.astype(np.float64).sum(0), f"column sums of {n} x {cols}", 3e-5)


def test_causal_softmax_equals_pytorch(train_kernels):
    rng = np.random.default_rng(6)
    groups, t, scale = 3, 45, 0.125  # rows longer than a warp
    s = rng.standard_normal((groups, t, t), dtype=np.float32) * 5
    p = s.copy()
    train_kernels.emu_softmax_causal(ptr(p), groups * t, t, scale, ptr(p), 0)
    st = f64(s, True)
    masked = (st * scale).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(masked, -1)
    dp = rng.standard_normal((groups, t, t), dtype=np.float32)
    want.backward(f64(dp))
    close(p, want.detach().numpy(), "causal softmax", 1e-6)
    ds = dp.copy()
    train_kernels.emu_softmax_causal(ptr(ds), groups * t, t, scale, ptr(p), 1)
    close(ds, st.grad.numpy(), "causal softmax backward", 1e-5)


def test_embeddings_and_their_gradients_equal_pytorch(train_kernels):
    rng = np.random.default_rng(7)
    b, t, c, vocab, positions = 3, 11, 40, 17, 16
    wte = rng.standard_normal((vocab, c), dtype=np.float32)
    wpe = rng.standard_normal((positions, c), dtype=np.float32)
    ids = rng.integers(0, vocab, b * t).astype(np.uint32)  # repeated ids: atomic adds
    dx = rng.standard_normal((b * t, c), dtype=np.float32)
    x = np.full((b * t, c), np.nan, np.float32)
    dwte, dwpe = np.zeros((vocab, c), np.float32), np.zeros((positions, c), np.float32)
    train_kernels.emu_embed(ptr(x), ptr(wte), ptr(wpe), ids.ctypes.data, b, t, c, ptr(dwte), ptr(dwpe), ptr(dx))
    te, pe = f64(wte, True), f64(wpe, True)
    want = te[torch.tensor(ids.astype(np.int64))] + pe[:t].repeat(b, 1)
    want.backward(f64(dx))
    close(x, want.detach().numpy(), "embeddings", 1e-6)
    close(dwte, te.grad.numpy(), "token embedding gradient", 1e-5)
    close(dwpe, pe.grad.numpy(), "position embedding gradient", 1e-5)


def arrays(xs):
    """A C array of pointers to the float32 arrays xs."""
    return (F32 * len(xs))(*map(ptr, xs))


def test_adamw_and_the_sum_of_squares_equal_pytorch(train_kernels):
    # Three parameters in one launch, cut into chunks of 300 (cuda.rs uses 65,536): chunk
    # boundaries inside a parameter, a parameter shorter than a chunk, one without weight decay.
    rng = np.random.default_rng(8)
    sizes, decays, chunk = [1000, 37, 601], [True, False, True], 300
    lr, b1, b2, eps, wd, step, gscale = 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, 0.5
    th = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    g = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    m = [rng.standard_normal(n, dtype=np.float32) * 0.1 for n in sizes]
    v = [rng.random(n, dtype=np.float32) * 0.01 for n in sizes]
    # torch.optim.AdamW at step 3 from these moments, on the gradients times gscale
    params = [torch.nn.Parameter(f64(x)) for x in th]
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": wd if d else 0.0} for p, d in zip(params, decays)],
                            lr=lr, betas=(b1, b2), eps=eps)
    for p, gi, mi, vi in zip(params, g, m, v):
        p.grad = f64(gi) * gscale
        opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": f64(mi), "exp_avg_sq": f64(vi)}
    opt.step()
    ours = [[x.copy() for x in xs] for xs in (th, m, v)]
    lens = (ctypes.c_int64 * 3)(*sizes)
    keeps = np.array([1 - lr * wd if d else 1.0 for d in decays], dtype=np.float32)
    train_kernels.emu_adamw(3, arrays(ours[0]), arrays(g), arrays(ours[1]), arrays(ours[2]), lens,
                            ptr(keeps), chunk, b1, b2, gscale, lr, 1 / (1 - b1 ** step),
                            1 / (1 - b2 ** step), eps)
    for i, p in enumerate(params):
        close(ours[0][i], p.detach().numpy(), f"AdamW weights {i}", 1e-6)
        close(ours[1][i], opt.state[p]["exp_avg"].numpy(), f"AdamW first moment {i}", 1e-6)
        close(ours[2][i], opt.state[p]["exp_avg_sq"].numpy(), f"AdamW second moment {i}", 1e-6)
    xs = [rng.standard_normal(n, dtype=np.float32) for n in (100_003, 5, 70_000)]
    want = sum(float((x.astype(np.float64) ** 2).sum()) for x in xs)
    got = train_kernels.emu_sum_squares(3, arrays(xs), (ctypes.c_int64 * 3)(*map(len, xs)), 65_536)
    assert abs(got - want) < 1e-9 * want
