#!/usr/bin/env bash
# GPU checks and benchmarks on a CUDA machine, for an lmkit built with `--features cuda`
# (scripts/build-cuda.sh builds one, also on a machine without a GPU):
#   LMKIT_BIN=path/to/lmkit [LMKIT_GPU_TESTS=DIR] bash bench/gpu_check.sh [OUT_DIR]
# 0. with LMKIT_GPU_TESTS, a directory of test executables built with the cuda feature
#    (`scripts/build-cuda.sh --tests`): their GPU tests (the GPU training passes, AdamW and the
#    kernels against the CPU, decoding steps and prompts through the cache attention kernels,
#    inference's fused norms, SwiGLU and linear layers), which must find a GPU;
# 1. transformers parity (logits, greedy generation, training → HF load) with lmkit on the GPU;
# 2. the same tiny training run on CPU and on the GPU (full f32 products): loss curves side by side;
#    then a GPT-2-small-shaped run (TF32) with the flash attention kernels, with the [t, t]
#    probabilities kept (LMKIT_CUDA_ATTENTION=materialized), and with flash attention and bf16
#    products (train.dtype = "bf16"): the pass's phases and its attention timed, losses compared,
#    attention's time next to PyTorch's scaled_dot_product_attention on the same shapes;
#    every kernel's and product shape's time within one such pass (LMKIT_CUDA_TIMING=ops), with
#    the kept probabilities and with flash attention and bf16 products (and those with the MLP
#    bias's gradient summed by the GELU gradient's product, LMKIT_CUDA_BGRAD=epilogue, and with
#    the flash forward and dQ kernels' 128-row blocks, LMKIT_CUDA_FLASH_ROWS=128);
#    and a SmolLM2-135M-shaped Llama (30 layers, 576 dims, 9 query / 3 key-value heads) trained by
#    the hand-written GPU pass (LMKIT_CUDA_ATTENTION=flash) and by the autograd graph;
# 3. bench/train_bench.py --device cuda: training and decoding speed vs PyTorch on the same GPU
#    (eager f32, eager bf16 autocast + SDPA, torch.compile), and the autograd path as a baseline;
#    GPT-2 small again with lmkit's flash attention and bf16 products (and beside it the same
#    lmkit with LMKIT_CUDA_BGRAD=epilogue: the MLP bias's gradient summed by the GELU gradient's
#    product instead of its own column sums); the SmolLM2-135M-shaped Llama (context 1024, batch 8)
#    through lmkit's hand-written pass (flash attention, bf16 products) vs PyTorch eager bf16
#    autocast + SDPA (LlamaForCausalLM);
# 4. bench/serve_bench.py --device cuda --peer: `lmkit serve` with 8 and 32 streaming clients vs
#    transformers' generate with batches of 8 and 32; bench/prefill_bench.py --device cuda: 8 and
#    32 prompts sent at once, read in packed passes and one at a time, vs transformers; each
#    lmkit run again with LMKIT_CUDA_DECODE=0 (the cache attention through composed ops);
#    bench/chat_turns_bench.py --device cuda: a chat's turns with and without the prefix cache;
#    bench/shared_prompt_bench.py --device cuda: requests with one system prompt, staggered;
# 5. (`long`) bench/real_model_bench.py --device cuda --random: batch-1 generation after a
#    4,000-token prompt with a SmolLM2-135M-shaped Llama, lmkit (and again with
#    LMKIT_CUDA_DECODE=0) vs transformers: prompt and decoding tokens/s over a long cache; then
#    the same model in bf16 (`--dtype bf16`) vs transformers in bf16 (and with LMKIT_CUDA_KEEP_FREED=0).
# 6. (`dp`, where the machine has 2 or more GPUs) bench/dp_bench.py --device cuda: `lmkit train
#    --gpus N` (NCCL) vs PyTorch DDP (NCCL, bf16 autocast) for N = 1, 2, ... up to the GPUs there.
# Keeps going after a failed step (to collect everything) and exits non-zero if any failed.
# GPU_CHECK_ONLY="tests attention ..." runs only those steps (tests, parity, curves, attention,
# ops, llama, speed, serve, long, dp), for a device command that must stay within its time limit.
set -uo pipefail
failed=()
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${LMKIT_BIN:?set LMKIT_BIN to an lmkit built with --features cuda}"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Whether step $1 runs (all of them without GPU_CHECK_ONLY).
want() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ " $GPU_CHECK_ONLY " == *" $1 "* ]]; }

if [ -n "${LMKIT_GPU_TESTS:-}" ] && want tests; then
  echo "== GPU unit tests"
  for t in "$LMKIT_GPU_TESTS"/*; do
    [ -x "$t" ] || continue
    log="$out/test-$(basename "$t").log"
    LMKIT_REQUIRE_CUDA=1 "$t" gpu --test-threads 1 > "$log" 2>&1 || failed+=("tests $(basename "$t")")
    tail -8 "$log"
  done
fi

if want parity; then
echo "== parity with transformers, lmkit on cuda"
LMKIT_BIN="$bin" LMKIT_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider \
  "$here/tests/parity/test_transformers_decoders.py" > "$out/parity.log" 2>&1 || failed+=("parity on cuda")
tail -15 "$out/parity.log"
fi

# The training runs' tokenizer and data.
tmp="$(mktemp -d)"
if want curves || want attention || want ops || want llama; then
"$bin" tokenizer train --input "$here/data/en" --vocab-size 2048 --output "$tmp/tok" >/dev/null
"$bin" tokenizer encode --tokenizer "$tmp/tok" --input "$here/data/en" --shards "$tmp/shards" >/dev/null
fi

if want curves; then
echo "== the same training run on cpu and cuda"
for dev in cpu cuda; do
  "$bin" train --config "$here/configs/gpt-small.toml" --set "data.train=\"$tmp/shards\"" \
    --set "data.tokenizer=\"$tmp/tok\"" --set "train.out_dir=\"$tmp/$dev\"" --set train.max_steps=40 \
    --set train.eval_every=20 --set train.save_every=40 --set "train.device=\"$dev\"" --set train.tf32=false \
    2>"$out/train-$dev.log" || failed+=("training on $dev")
  cp "$tmp/$dev/metrics.jsonl" "$out/metrics-$dev.jsonl" 2>/dev/null || true
done
"$py" - "$tmp" <<'PY'
import json, sys
runs = {d: [json.loads(l) for l in open(f"{sys.argv[1]}/{d}/metrics.jsonl")] for d in ("cpu", "cuda")}
steps = {d: {r["step"]: r for r in rs if "loss" in r} for d, rs in runs.items()}
print("| step | loss cpu | loss cuda | |diff| | tok/s cpu | tok/s cuda |")
print("|---|---|---|---|---|---|")
worst = 0.0
for s in sorted(set(steps["cpu"]) & set(steps["cuda"])):
    a, b = steps["cpu"][s], steps["cuda"][s]
    worst = max(worst, abs(a["loss"] - b["loss"]))
    if s % 10 == 0 or s == 1:
        print(f"| {s} | {a['loss']:.4f} | {b['loss']:.4f} | {abs(a['loss'] - b['loss']):.2e} | {a.get('tokens_per_sec', 0):,.0f} | {b.get('tokens_per_sec', 0):,.0f} |")
# The same run on two devices: the curves may differ by rounding only.
sys.exit(0 if steps["cpu"] and worst < 1e-3 else f"cpu and cuda losses differ by {worst:.2e}")
PY
[ $? -eq 0 ] || failed+=("cpu/cuda loss curves")
fi

# A GPT-2-small-shaped training run (12 layers, 768 dims, context 1024, batch 8) on the GPU: RUN is
# flash, materialized (the kept [t, t] probabilities) or flash-bf16 (train.dtype = "bf16"), with
# -unfused: the biases and residuals written before the products (LMKIT_CUDA_EPILOGUE=0), or
# -bgrad: the MLP bias's gradient summed by the GELU gradient's product (LMKIT_CUDA_BGRAD=epilogue),
# or -rows128: the flash forward and dQ kernels with 128 rows a block, two row blocks a warp
# (LMKIT_CUDA_FLASH_ROWS=128), or -autotune: the epilogue products' algorithms timed and the
# fastest kept (LMKIT_CUDA_AUTOTUNE=1).
#   gpt2_small RUN STEPS OUT_DIR
gpt2_small() {
  local run="${1%-unfused}" epilogue=1 bgrad= rows= tune=
  [ "$run" != "$1" ] && epilogue=0
  [ "${run%-bgrad}" != "$run" ] && run="${run%-bgrad}" && bgrad=epilogue
  [ "${run%-rows128}" != "$run" ] && run="${run%-rows128}" && rows=128
  [ "${run%-autotune}" != "$run" ] && run="${run%-autotune}" && tune=1
  local att="${run%-bf16}" dtype=f32
  [ "$run" = flash-bf16 ] && dtype=bf16
  LMKIT_CUDA_AUTOTUNE=$tune LMKIT_CUDA_FLASH_ROWS=$rows LMKIT_CUDA_BGRAD=$bgrad LMKIT_CUDA_EPILOGUE=$epilogue LMKIT_CUDA_ATTENTION=$att "$bin" train --config "$here/configs/gpt-small.toml" \
    --set "data.train=\"$tmp/shards\"" --set "data.tokenizer=\"$tmp/tok\"" \
    --set model.n_layer=12 --set model.n_head=12 --set model.n_embd=768 --set model.n_positions=1024 \
    --set train.seq_len=1024 --set train.batch_size=8 --set "train.max_steps=$2" --set train.log_every=1 \
    --set "train.warmup_steps=$(( $2 / 4 > 0 ? $2 / 4 : 1 ))" \
    --set train.eval_every=1000 --set train.save_every=1000 --set 'train.device="cuda"' \
    --set "train.dtype=\"$dtype\"" --set "train.out_dir=\"$3\""
}

if want ops; then
echo "== where a GPT-2-small step's time goes: each kernel and product shape (LMKIT_CUDA_TIMING=ops)"
for run in materialized flash-bf16 flash-bf16-bgrad flash-bf16-rows128 flash-bf16-autotune; do
  LMKIT_CUDA_TIMING=ops gpt2_small "$run" 3 "$tmp/ops-$run" 2>"$out/ops-$run.log" || failed+=("ops $run")
  # The last step's pass: its phases, then its 25 longest ops.
  echo "$run:"; grep "cuda pass" "$out/ops-$run.log" | tail -1
  tac "$out/ops-$run.log" | awk '/^cuda pass/ {exit} /^cuda op/' | tac | head -25
done
fi

if want attention; then
echo "== attention on the GPU: flash kernels vs kept probabilities (TF32 products), and bf16 products"
for run in flash materialized flash-bf16 flash-bf16-bgrad flash-bf16-rows128 flash-bf16-unfused; do
  LMKIT_CUDA_TIMING=1 gpt2_small "$run" 8 "$tmp/att-$run" 2>"$out/attention-$run.log" \
    || failed+=("attention $run")
  echo "$run:"; grep "cuda pass" "$out/attention-$run.log" | tail -3
done
"$py" - "$tmp" <<'PY'
import json, sys
runs = {a: {r["step"]: r for r in map(json.loads, open(f"{sys.argv[1]}/att-{a}/metrics.jsonl"))
            if "loss" in r and "step" in r}
        for a in ("flash", "materialized", "flash-bf16", "flash-bf16-bgrad", "flash-bf16-rows128",
                  "flash-bf16-unfused")}
ref = runs["materialized"]
bad = []
for a, tol in (("flash", 2e-2), ("flash-bf16", 5e-2), ("flash-bf16-bgrad", 5e-2), ("flash-bf16-rows128", 5e-2),
               ("flash-bf16-unfused", 5e-2)):
    both = sorted(set(runs[a]) & set(ref))
    worst = max((abs(runs[a][s]["loss"] - ref[s]["loss"]) for s in both), default=float("inf"))
    print(f"{a}: losses {[round(runs[a][s]['loss'], 4) for s in both]} vs {[round(ref[s]['loss'], 4) for s in both]}"
          f" (worst {worst:.2e}); tokens/s {[round(runs[a][s].get('tokens_per_sec', 0)) for s in both]}"
          f" vs {[round(ref[s].get('tokens_per_sec', 0)) for s in both]}")
    if worst >= tol:
        bad.append(f"{a} differs from materialized TF32 by {worst:.2e}")
# TF32 against TF32: rounding only; bf16 products: 8-bit mantissas.
sys.exit("; ".join(bad) if bad else 0)
PY
[ $? -eq 0 ] || failed+=("flash/materialized loss curves")
# Attention alone, per step (12 layers of [8, 12 heads, 1024, 64]): lmkit's kernels (the pass's
# LMKIT_CUDA_TIMING split, median over steps 2-8) next to PyTorch's scaled_dot_product_attention
# (FlashAttention-2 for bf16; TF32 allowed for f32), forward and forward + backward timed apart.
"$py" - "$out" <<'PY'
import re, statistics, sys, time
import torch
out = sys.argv[1]
for run in ("flash", "materialized", "flash-bf16", "flash-bf16-bgrad", "flash-bf16-rows128", "flash-bf16-unfused"):
    try:
        log = open(f"{out}/attention-{run}.log").read()
    except FileNotFoundError:
        continue
    pairs = [tuple(map(float, m)) for m in re.findall(r"forward ([0-9.]+) ms, backward ([0-9.]+) ms\)", log)][1:]
    if pairs:
        f, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"lmkit {run}: attention forward {f:.2f} ms, backward {b:.2f} ms per step")
torch.backends.cuda.matmul.allow_tf32 = True
sdpa = torch.nn.functional.scaled_dot_product_attention
for dtype in (torch.bfloat16, torch.float32):
    q, k, v = (torch.randn(8, 12, 1024, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(8, 12, 1024, 64, device="cuda", dtype=dtype)
    def step(backward):
        for _ in range(12):
            o = sdpa(q, k, v, is_causal=True)
            if backward:
                o.backward(g)
    times = {}
    for backward in (False, True):
        step(backward)
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            step(backward)
            torch.cuda.synchronize()
            runs.append((time.perf_counter() - t0) * 1e3)
        times[backward] = statistics.median(runs)
    print(f"PyTorch SDPA {dtype}: attention forward {times[False]:.2f} ms, backward {times[True] - times[False]:.2f} ms per step")
PY
[ $? -eq 0 ] || failed+=("attention timings")
fi

if want llama; then
echo "== Llama on the GPU: the hand-written pass (flash attention) vs the autograd graph (TF32 products)"
cat > "$tmp/llama.toml" <<TOML
[model]
model_type = "llama"
hidden_size = 576
intermediate_size = 1536
num_hidden_layers = 30
num_attention_heads = 9
num_key_value_heads = 3
max_position_embeddings = 2048
rms_norm_eps = 1e-5
rope_theta = 10000.0
tie_word_embeddings = true

[data]
train = "$tmp/shards"
tokenizer = "$tmp/tok"

[train]
seq_len = 1024
batch_size = 8
max_steps = 8
warmup_steps = 2
log_every = 1
eval_every = 1000
save_every = 1000
device = "cuda"
TOML
for att in flash materialized; do
  LMKIT_CUDA_TIMING=1 LMKIT_CUDA_ATTENTION=$att "$bin" train --config "$tmp/llama.toml" \
    --set "train.out_dir=\"$tmp/llama-$att\"" 2>"$out/llama-$att.log" || failed+=("llama $att")
done
grep "cuda pass" "$out/llama-flash.log" | tail -3
# Where a step of the Llama pass goes, with bf16 products (its backward took 3x its forward):
# the last step's phases, then its 25 longest ops.
LMKIT_CUDA_TIMING=ops LMKIT_CUDA_ATTENTION=flash "$bin" train --config "$tmp/llama.toml" \
  --set "train.out_dir=\"$tmp/llama-ops\"" --set 'train.dtype="bf16"' --set train.max_steps=3 \
  2>"$out/llama-ops.log" || failed+=("llama ops")
echo "llama, flash + bf16:"; grep "cuda pass" "$out/llama-ops.log" | tail -1
tac "$out/llama-ops.log" | awk '/^cuda pass/ {exit} /^cuda op/' | tac | head -25
"$py" - "$tmp" <<'PY'
import json, sys
runs = {a: [r for r in map(json.loads, open(f"{sys.argv[1]}/llama-{a}/metrics.jsonl")) if "loss" in r and "step" in r]
        for a in ("flash", "materialized")}
for a, rs in runs.items():
    print(f"{a}: losses {[round(r['loss'], 4) for r in rs]}; tokens/s {[round(r.get('tokens_per_sec', 0)) for r in rs]}")
worst = max((abs(x["loss"] - y["loss"]) for x, y in zip(runs["flash"], runs["materialized"])), default=float("inf"))
sys.exit(0 if worst < 2e-2 else f"the Llama GPU pass and the autograd graph differ by {worst:.2e}")
PY
[ $? -eq 0 ] || failed+=("llama pass/autograd loss curves")
fi

if want speed; then
echo "== speed vs PyTorch on the GPU"
LMKIT_BIN="$bin" "$py" "$here/bench/train_bench.py" --device cuda --steps 20 --baseline "$bin" \
  --baseline-set 'train.backward="autograd"' || failed+=("bench small")
LMKIT_BIN="$bin" "$py" "$here/bench/train_bench.py" --device cuda --steps 10 --layers 12 --heads 12 --dim 768 \
  --ctx 1024 --batch 8 || failed+=("bench large")
echo "== speed vs PyTorch, GPT-2 small: lmkit with flash attention and bf16 products"
LMKIT_CUDA_ATTENTION=flash LMKIT_BIN="$bin" "$py" "$here/bench/train_bench.py" --device cuda --steps 10 \
  --layers 12 --heads 12 --dim 768 --ctx 1024 --batch 8 --lmkit-set 'train.dtype="bf16"' \
  --baseline "$bin" --baseline-env LMKIT_CUDA_BGRAD=epilogue || failed+=("bench large bf16")
echo "== speed vs PyTorch, a SmolLM2-135M-shaped Llama: lmkit's pass with flash attention and bf16 products"
LMKIT_CUDA_ATTENTION=flash LMKIT_BIN="$bin" "$py" "$here/bench/train_bench.py" --device cuda --steps 10 \
  --rounds 2 --family llama --layers 30 --heads 9 --kv-heads 3 --dim 576 --inter 1536 --ctx 1024 \
  --batch 8 --torch-modes bf16 --lmkit-set 'train.dtype="bf16"' || failed+=("bench llama bf16")
fi

if want serve; then
echo "== serving on the GPU vs transformers' batched generate (8 and 32 streams)"
if "$py" -c "import openai" 2>/dev/null; then
  for n in 8 32; do
    LMKIT_BIN="$bin" "$py" "$here/bench/serve_bench.py" --device cuda --clients $n --requests $((2 * n)) \
      --max-active $n --max-tokens 64 --peer || failed+=("serve bench $n")
    echo "-- the same without the cache attention kernels (LMKIT_CUDA_DECODE=0: composed ops)"
    LMKIT_CUDA_DECODE=0 LMKIT_BIN="$bin" "$py" "$here/bench/serve_bench.py" --device cuda --clients $n \
      --requests $((2 * n)) --max-active $n --max-tokens 64 || failed+=("serve bench $n, composed")
  done
  echo "== serving in bf16 on the GPU (32 streams) vs transformers' batched generate in bf16"
  LMKIT_BIN="$bin" "$py" "$here/bench/serve_bench.py" --device cuda --dtype bf16 --clients 32 \
    --requests 64 --max-active 32 --max-tokens 64 --peer || failed+=("serve bench bf16")
  echo "== prompts arriving together on the GPU: packed passes vs one at a time vs transformers"
  LMKIT_BIN="$bin" "$py" "$here/bench/prefill_bench.py" --device cuda --bursts 8,32 --repeats 5 \
    || failed+=("prefill bench")
  echo "-- the same without the cache attention kernels (LMKIT_CUDA_DECODE=0: composed ops)"
  LMKIT_CUDA_DECODE=0 LMKIT_BIN="$bin" "$py" "$here/bench/prefill_bench.py" --device cuda --bursts 8,32 \
    --repeats 3 || failed+=("prefill bench, composed")
  echo "== a chat's turns on the GPU: the prefix cache vs every turn read whole vs transformers"
  LMKIT_BIN="$bin" "$py" "$here/bench/chat_turns_bench.py" --device cuda --turns 6 --repeats 3 \
    || failed+=("chat turns bench")
  echo "== requests sharing a system prompt on the GPU, sent while the earlier ones decode: the prefix cache vs none"
  LMKIT_BIN="$bin" "$py" "$here/bench/shared_prompt_bench.py" --device cuda --repeats 3 \
    || failed+=("shared prompt bench")
else
  echo "skipped: the openai package is not installed (pip install openai)"
fi
fi

if want long; then
echo "== batch-1 generation after a long prompt on the GPU: lmkit (and with composed attention) vs transformers"
LMKIT_BIN="$bin" "$py" "$here/bench/real_model_bench.py" --device cuda --random --prompt 4000 --decode 128 \
  --rounds 3 --baseline-env LMKIT_CUDA_DECODE=0 || failed+=("long-context bench")
echo "== the same in bf16: lmkit --dtype bf16 vs transformers in bf16"
LMKIT_BIN="$bin" "$py" "$here/bench/real_model_bench.py" --device cuda --random --prompt 4000 --decode 128 \
  --rounds 3 --dtype bf16 --baseline-env LMKIT_CUDA_KEEP_FREED=0 || failed+=("long-context bench bf16")
fi
if want dp; then
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then
  echo "== data-parallel training on $gpus GPUs: lmkit train --gpus N vs PyTorch DDP"
  sizes=1; n=2
  while [ "$n" -le "$gpus" ]; do sizes="$sizes,$n"; n=$((n * 2)); done
  LMKIT_BIN="$bin" "$py" "$here/bench/dp_bench.py" --device cuda --procs "$sizes" --rounds 3 --steps 10 \
    --layers 12 --heads 12 --dim 768 --ctx 1024 --batch 8 || failed+=("data-parallel bench")
else
  echo "== data-parallel training: skipped ($gpus GPU: NCCL between GPUs needs 2 or more)"
fi
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (logs in $out)" >&2
  exit 1
fi
echo "all GPU checks passed (logs in $out)"
