#!/usr/bin/env bash
# The main job on the bundled corpus: prepare the corpus (clean, filter, deduplicate, split), train a
# byte-level BPE tokenizer and write token shards, build n-gram language models for English (words)
# and Korean (characters) and score, rank and measure perplexity on held-out text, then train a
# small GPT for a few minutes and generate text with it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-system.sh
cargo build --release --locked -p lmkit-cli
lmkit="${CARGO_TARGET_DIR:-$root/target}/release/lmkit"
out="${LMKIT_OUT:-$root/runs/quickstart}"
mkdir -p "$out"

echo "== Prepare the corpus: normalize, filter, deduplicate, split"
"$lmkit" data prepare --input data/en data/ko --dates --output "$out/prepared"
echo "== Train a byte-level BPE tokenizer and write token shards"
"$lmkit" tokenizer train --input "$out"/prepared/train-*.jsonl --vocab-size 8192 --output "$out/tokenizer"
"$lmkit" tokenizer stats --tokenizer "$out/tokenizer" --input data/en data/ko
"$lmkit" tokenizer encode --tokenizer "$out/tokenizer" --input "$out/prepared" --shards "$out/shards"

# Hold out every 20th line for evaluation.
awk 'NR % 20 != 0' data/en/web_bible.txt > "$out/en.train.txt"
awk 'NR % 20 == 0' data/en/web_bible.txt > "$out/en.held.txt"
cat data/ko/*.txt | awk 'NR % 20 != 0' > "$out/ko.train.txt"
cat data/ko/*.txt | awk 'NR % 20 == 0' > "$out/ko.held.txt"

echo "== English word 3-gram (ARPA, then binary)"
"$lmkit" ngram train --order 3 --input "$out/en.train.txt" --output "$out/en.arpa"
"$lmkit" ngram convert "$out/en.arpa" "$out/en.lmkb"
"$lmkit" ngram ppl --model "$out/en.lmkb" --input "$out/en.held.txt"
echo "== English: rank candidate sentences"
"$lmkit" ngram rank --model "$out/en.lmkb" \
  "In the beginning, God created the heavens and the earth." \
  "In the beginning, God created the earth and the heavens." \
  "The beginning in, created God the earth heavens and the."

echo "== Korean character 5-gram (binary)"
"$lmkit" ngram train --order 5 --chars --input "$out/ko.train.txt" --output "$out/ko.lmkb"
"$lmkit" ngram ppl --model "$out/ko.lmkb" --input "$out/ko.held.txt"
echo "== Korean: rank candidate sentences"
"$lmkit" ngram rank --model "$out/ko.lmkb" "나는 버스를 탔다" "나는 버스를 태운다" "국민은 법 앞에 평등하다" "국민은 법 앞에 평등한다"
echo "== Train a small GPT (configs/gpt-small.toml; at most ${LMKIT_TRAIN_SECONDS:-180} s) and generate"
"$lmkit" train --overwrite --config configs/gpt-small.toml --set "train.out_dir=\"$out/gpt\"" \
  --set "data.train=\"$out/shards\"" --set "data.tokenizer=\"$out/tokenizer\"" --max-time "${LMKIT_TRAIN_SECONDS:-180}"
"$lmkit" generate --model "$out/gpt" --prompt "In the beginning" --max-tokens 40 --seed 1
"$lmkit" generate --model "$out/gpt" --prompt "대한민국은" --max-tokens 40 --seed 1
echo "== Serve it over the OpenAI-compatible API and ask once"
"$lmkit" serve "$out/gpt" --port 0 --db "$out/completions.sqlite" 2> "$out/serve.log" &
server=$!
for _ in $(seq 100); do grep -q "serving" "$out/serve.log" && break; sleep 0.1; done
addr="$(grep -o 'http://[0-9.]*:[0-9]*' "$out/serve.log" | head -1)"
python3 - "$addr" <<'PY'
import json, sys, urllib.request
body = {"messages": [{"role": "user", "content": "In the beginning"}], "max_tokens": 30, "seed": 1}
req = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req))
print("POST /v1/chat/completions ->", repr(r["choices"][0]["message"]["content"]), r["usage"])
PY
kill "$server"; wait "$server" 2>/dev/null || true
echo "models, splits, shards, checkpoints, metrics.jsonl, loss.svg and completions.sqlite are in $out"
echo "serve it yourself: $lmkit serve $out/gpt   (then open http://127.0.0.1:8000/ for the chat page)"
