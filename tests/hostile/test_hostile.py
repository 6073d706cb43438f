"""Hostile or mistaken input, table-driven: each case runs the lmkit binary on generated input
with its address space capped (RLIMIT_AS, 4 GiB) and a time limit, and must end with a clear error
(exit code 1, the file or field named in the message), not a panic, an abort on allocation or a
hang, and must leave no partial output behind."""
import json
import os
import pathlib
import resource
import struct
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
MEMORY = 4 << 30
# What a panic, an abort on allocation or a crash leaves in stderr.
SIGNS = ("panicked", "memory allocation of", "Aborted", "RUST_BACKTRACE")


def cap():
    """Caps the address space of the process about to run (a `preexec_fn`)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run(args, cwd, env=None, stdin=None):
    """`env`: the environment instead of this process's; `stdin`: a file for standard input."""
    return subprocess.run([BIN, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          preexec_fn=cap, env=env, stdin=stdin)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and token shards of a small corpus, made without limits."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "c.txt").write_text("the cat sat on the mat. " * 2000 + "\n", encoding="utf-8")
    for args in (["tokenizer", "train", "--input", "c.txt", "--vocab-size", "300", "--output", "tok"],
                 ["tokenizer", "encode", "--tokenizer", "tok", "--input", "c.txt", "--shards", "shards"]):
        p = subprocess.run([BIN, *args], cwd=d, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    return d


def run_config(d, model=None, train=None):
    m = {"model_type": "gpt2", "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, **(model or {})}
    t = {"out_dir": "out", "seq_len": 16, "batch_size": 4, "max_steps": 2, **(train or {})}
    lines = ["[model]", *(f"{k} = {json.dumps(v)}" for k, v in m.items()),
             "[data]", f'train = "{d}/shards"', f'tokenizer = "{d}/tok"',
             "[train]", *(f"{k} = {json.dumps(v)}" for k, v in t.items())]
    return "\n".join(lines) + "\n"


def safetensors_claiming(n_bytes):
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}}).encode()
    return struct.pack("<Q", len(header)) + header


# (name, files to write {path: text or bytes}, arguments, text the error must contain, paths that must not exist)
CASES = [
    ("arpa declaring 10^12 unigrams",
     {"m.arpa": "\\data\\\nngram 1=1000000000000\n\n\\1-grams:\n-1.0\t<s>\n\\end\\\n", "t.txt": "a b\n"},
     ["ngram", "ppl", "-m", "m.arpa", "--input", "t.txt"], "m.arpa", []),
    ("safetensors header claiming 4 TB",
     {"m/config.json": json.dumps({"model_type": "gpt2", "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 1,
                                   "vocab_size": 10}),
      "m/model.safetensors": safetensors_claiming(4 << 40)},
     ["model", "logits", "--model", "m", "--ids", "1,2"], "model.safetensors", []),
    ("config with n_embd = 0",
     {"m/config.json": json.dumps({"model_type": "gpt2", "n_positions": 8, "n_embd": 0, "n_layer": 1, "n_head": 1,
                                   "vocab_size": 10})},
     ["model", "logits", "--model", "m", "--ids", "1"], "n_embd must be positive", []),
    ("tokenizer with 10^9 tokens",
     {"c.txt": "a b c\n"},
     ["tokenizer", "train", "--input", "c.txt", "--vocab-size", "1000000000", "--output", "tok"], "vocab_size",
     ["tok"]),
    ("input without line ends (/dev/zero, read endlessly)",
     {"m.arpa": "\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<s>\t0\n-1.0\t</s>\n-1.0\t<unk>\n\n\\end\\\n"},
     ["ngram", "ppl", "-m", "m.arpa", "--input", "/dev/zero"], "/dev/zero:1: line is longer than 256 MiB", []),
    ("truncated lmkb",
     {"m.lmkb": b"LMKB" + b"\x01\x00\x00\x00" + b"\x00" * 40, "t.txt": "a\n"},
     ["ngram", "ppl", "-m", "m.lmkb", "--input", "t.txt"], "m.lmkb", []),
    ("tokenizer.json cut off in its decoder",
     {"tok/tokenizer.json": '{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], '
                            '"normalizer": null, "pre_tokenizer": null, "post_processor": null, '
                            '"decoder": {"type": "ByteLevel", "add_prefix_space": false', "t.txt": "a b\n"},
     ["tokenizer", "encode", "--tokenizer", "tok", "--input", "t.txt", "--shards", "shards"],
     "tokenizer.json: cannot load tokenizer: not valid JSON", ["shards"]),
    # Sizes given on the command line that were allocated before they were checked.
    ("n-gram order of 10^12", {"t.txt": "a b\n"},
     ["ngram", "train", "--order", "1000000000000", "--input", "t.txt", "--output", "m.arpa"], "order must be between",
     ["m.arpa"]),
    ("10^12 MinHash permutations", {"t.txt": "a b\n"},
     ["data", "prepare", "--input", "t.txt", "--output", "out", "--num-perm", "1000000000000"], "num_perm",
     ["out"]),
    ("10^12 beams", {}, ["generate", "--model", "m", "--source", "a", "--num-beams", "1000000000000"],
     "--num-beams", []),
    ("a serving queue of 10^12", {},
     ["serve", "m", "--port", "0", "--db", "q.sqlite", "--max-queue", "1000000000000"], "--max-queue", ["q.sqlite"]),
    ("not a GGUF",
     {"m.gguf": b"GGUX" + b"\x00" * 64},
     ["generate", "--model", "m.gguf", "--prompt-ids", "1", "--ids"], "m.gguf", []),
]

TRAIN_CASES = [
    ("n_embd = 10^9", {"n_embd": 10**9}, None, "needs about"),
    ("n_positions = 10^9", {"n_positions": 10**9}, None, "needs about"),
    ("batch of 10^8 sequences", None, {"batch_size": 10**8}, "needs about"),
    ("vocabulary of 10^9", {"vocab_size": 10**9}, None, "needs about"),
    # Sizes whose parameter count passes 2^64 (it wrapped to a small count, then allocation panicked).
    ("n_positions = 2^63 - 1", {"n_positions": 2**63 - 1}, None, "needs about"),
    ("n_inner = 2^63 - 1", {"n_inner": 2**63 - 1}, None, "needs about"),
]


def check(p, needle):
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert needle in p.stderr, p.stderr[-2000:]
    for sign in SIGNS:
        assert sign not in p.stderr, p.stderr[-2000:]


def assert_no_checkpoints(out):
    """A refused run left no checkpoint in its output directory `out`."""
    assert not (out.exists() and list(out.glob("ckpt-*"))), f"checkpoints left in {out}"


@pytest.mark.parametrize("name,files,args,needle,absent", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, name, files, args, needle, absent):
    for path, content in files.items():
        f = tmp_path / path
        f.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(content, encoding="utf-8")
    check(run(args, tmp_path), needle)
    for a in absent:
        assert not (tmp_path / a).exists(), f"{a} was left behind"


@pytest.mark.parametrize("name,model,train,needle", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_oversized_runs_are_refused_before_allocating(tmp_path, corpus, name, model, train, needle):
    (tmp_path / "run.toml").write_text(run_config(corpus, model, train))
    check(run(["train", "--config", "run.toml"], tmp_path), needle)
    assert_no_checkpoints(tmp_path / "out")


# (name, environment, extra arguments of `lmkit train`, text the error must contain): a data-parallel
# group's settings (torchrun's variables, --procs) out of range.
GROUP_CASES = [
    ("WORLD_SIZE of 10^12", {"WORLD_SIZE": str(10**12), "RANK": "0", "MASTER_PORT": "29500"}, [], "WORLD_SIZE"),
    ("MASTER_PORT of 70000", {"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "70000"}, [], "MASTER_PORT=70000"),
    ("RANK not a number", {"WORLD_SIZE": "2", "RANK": "first", "MASTER_PORT": "29500"}, [], "RANK=first"),
    ("--procs 10^12", {}, ["--procs", str(10**12)], "--procs/--gpus"),
]


@pytest.mark.parametrize("name,env,extra,needle", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_bad_group_settings_are_a_clear_error(tmp_path, corpus, name, env, extra, needle):
    (tmp_path / "run.toml").write_text(run_config(corpus))
    group = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    outside = {k: v for k, v in os.environ.items() if k not in group}
    p = run(["train", "--config", "run.toml", *extra], tmp_path, {**outside, **env})
    check(p, needle)
    assert_no_checkpoints(tmp_path / "out")


def random_words_line(path, n_bytes):
    """One line of `n_bytes` of random lower-case words (distinct words, nearly all of them)."""
    table = bytes((97 + i % 27) if i % 27 < 26 else 32 for i in range(256))
    with open(path, "wb") as f:
        f.write(os.urandom(n_bytes).translate(table) + b"\n")


def test_a_huge_line_trains_and_encodes_within_the_memory_cap(tmp_path, corpus):
    """A 200 MB line of distinct words took the tokenizer trainer past any memory (it keeps every
    distinct word); training reads the first 8 MiB of such a document and says so. Encoding keeps
    every byte, a piece at a time."""
    random_words_line(tmp_path / "huge.txt", 200 << 20)
    p = run(["tokenizer", "train", "--input", "huge.txt", "--vocab-size", "300", "--output", "tok"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 of 1 documents are longer than 8 MiB" in p.stderr, p.stderr
    random_words_line(tmp_path / "big.txt", 64 << 20)
    p = run(["tokenizer", "encode", "--tokenizer", corpus / "tok", "--input", "big.txt", "--shards", "shards"],
            tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "from 1 documents (67.11 MB)" in p.stderr, p.stderr


def test_endless_standard_input_is_a_clear_error(tmp_path):
    """Documents read from standard input without line ends (/dev/zero) grew one buffer until the
    allocation aborted; a line over 256 MiB is now a bad record naming its line."""
    with open("/dev/zero", "rb") as zero:
        p = run(["data", "prepare", "--input", "-", "--output", "out"], tmp_path, stdin=zero)
    check(p, "-:1: line is longer than 256 MiB")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("unit, what", [("paragraph", "paragraph"), ("file", "file (one document")])
def test_an_endless_paragraph_is_a_clear_error(tmp_path, unit, what):
    """Lines read without end as one paragraph (or as one file) grew one string until the
    allocation aborted; a paragraph or file over 256 MiB is now a bad record naming where it
    starts."""
    yes = subprocess.Popen(["yes", "a line of text"], stdout=subprocess.PIPE)
    try:
        p = run(["data", "prepare", "--input", "-", "--unit", unit, "--output", "out"], tmp_path,
                stdin=yes.stdout)
    finally:
        yes.kill()
        yes.wait()
        yes.stdout.close()
    check(p, f"-:1: {what}")
    assert "is longer than 256 MiB" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


# Runs a command and prints its exit code and peak resident memory. (A child forked from this test
# process would count this process's own memory, which it held until its exec, in its peak.)
PEAK = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def peak_memory(args, cwd):
    """Runs lmkit under the cap: its exit code, stderr and peak resident memory in bytes."""
    p = subprocess.run([sys.executable, "-c", PEAK, BIN, *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=120, preexec_fn=cap)
    rc, kib = map(int, p.stdout.split())
    return rc, p.stderr, kib * 1024


def test_a_huge_documents_ids_are_written_a_part_at_a_time(tmp_path, corpus):
    """A 64 MiB line of one-token bytes is 64 M ids: they were gathered into one vector before
    being written (a peak of ~630 MB; a 600 MB line aborted under the cap). Now they go to the
    shard a batch of pieces at a time, and the peak stays near the text's own copies."""
    n = 64 << 20
    (tmp_path / "nul.txt").write_bytes(b"\0" * n + b"\n")
    rc, err, peak = peak_memory(["tokenizer", "encode", "--tokenizer", corpus / "tok", "--input", "nul.txt",
                                 "--shards", "shards"], tmp_path)
    assert rc == 0, err[-2000:]
    header = json.loads((tmp_path / "shards" / "tokens-00000.json").read_text())
    assert (header["count"], header["documents"]) == (n + 1, 1), header
    assert peak < 5 * n, f"peak resident memory {peak / 2**20:.0f} MiB for a {n >> 20} MiB document"


def test_a_llama_declaring_a_huge_context_runs_within_the_memory_cap(tmp_path, corpus):
    """Rotary tables grow with the positions used (Qwen2.5-1M's config declares 1,010,000; a whole
    table of 10^12 took the model's load past any memory): such a Llama trains and generates
    under the cap, and a GGUF file, whose context length is 32 bits, is refused naming the field."""
    (tmp_path / "run.toml").write_text(
        '[model]\nmodel_type = "llama"\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 1\n'
        f'num_attention_heads = 2\nmax_position_embeddings = {10**12}\n'
        f'[data]\ntrain = "{corpus}/shards"\ntokenizer = "{corpus}/tok"\n'
        '[train]\nout_dir = "out"\nseq_len = 16\nbatch_size = 4\nmax_steps = 2\n')
    p = run(["train", "--config", "run.toml"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(["generate", "--model", "out", "--prompt", "the cat", "--max-tokens", "4", "--greedy"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "4 generated" in p.stderr, p.stderr
    check(run(["quantize", "out", "m.gguf", "--type", "q8_0"], tmp_path), "max_position_embeddings")
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture(scope="module")
def tuning(corpus, tmp_path_factory):
    """A tiny Llama base, chat rows and a LoRA fine-tuning config over them."""
    d = tmp_path_factory.mktemp("tuning")
    (d / "base.toml").write_text(
        '[model]\nmodel_type = "llama"\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 1\n'
        'num_attention_heads = 2\nmax_position_embeddings = 64\n'
        f'[data]\ntrain = "{corpus}/shards"\ntokenizer = "{corpus}/tok"\n'
        '[train]\nout_dir = "base"\nseq_len = 16\nbatch_size = 4\nmax_steps = 1\n')
    p = subprocess.run([BIN, "train", "--config", "base.toml"], cwd=d, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]}]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    (d / "sft.toml").write_text(
        f'base = "{d}/base"\n[data]\ntrain = "{d}/sft.jsonl"\n'
        '[train]\nmax_steps = 1\nbatch_size = 2\nseq_len = 32\n[lora]\nr = 4\nalpha = 8\n'
        'target_modules = "all-linear"\n')
    return d


# (name, --set overrides of the fine-tuning config, text the error must contain): sizes that aborted on
# allocation before anything was checked.
TUNING_CASES = [
    ("lora.r = 10^12", ["lora.r=1000000000000"], "lower lora.r"),
    ("batch of 10^12 rows", ["train.batch_size=1000000000000"], "train.batch_size (1000000000000)"),
]


@pytest.mark.parametrize("name,sets,needle", TUNING_CASES, ids=[c[0] for c in TUNING_CASES])
def test_oversized_tuning_is_refused_before_allocating(tmp_path, tuning, name, sets, needle):
    args = ["finetune", "--config", tuning / "sft.toml", "--set", f'train.out_dir="{tmp_path}/out"']
    for s in sets:
        args += ["--set", s]
    check(run(args, tmp_path), needle)
    assert_no_checkpoints(tmp_path / "out")


def test_oversized_rl_group_is_refused_before_its_directory_is_touched(tmp_path, tuning):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "the cat"}) + "\n")
    (tmp_path / "rl.toml").write_text(
        f'base = "{tuning}/base"\n[data]\nprompts = "{tmp_path}/prompts.jsonl"\n'
        '[rl]\ngroup_size = 1000000000000\nmax_new_tokens = 4\n[reward]\nregex = "a"\n'
        f'[train]\nout_dir = "{tmp_path}/out"\nmax_steps = 1\nbatch_size = 2\nseq_len = 32\n')
    check(run(["rl", "--config", tmp_path / "rl.toml"], tmp_path),
          "train.batch_size (2) × rl.group_size (1000000000000)")
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").iterdir())


def test_an_output_naming_a_pipe_or_a_link_is_written_through(tmp_path, corpus):
    """`--output` naming a symbolic link to standard output (what /dev/stdout is) or to a file is
    written through, and the link stays: the write's closing rename replaced the link with a
    file (run as root, `--output /dev/null` replaced the system's /dev/null with a file)."""
    out = tmp_path / "out.arpa"
    out.symlink_to("/proc/self/fd/1")
    args = ["ngram", "train", "--order", "2", "--discount-fallback", "--input", corpus / "c.txt", "--output", out]
    p = run(args, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("\\data\\"), p.stdout[:200]
    assert out.is_symlink()
    real = tmp_path / "real.arpa"
    real.write_text("old")
    (tmp_path / "link.arpa").symlink_to(real)
    p = run(args[:-1] + [tmp_path / "link.arpa"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "link.arpa").is_symlink()
    assert real.read_text().startswith("\\data\\")
