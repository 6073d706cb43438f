"""Mutated files, seeded: files lmkit wrote (tokenizer, token shards, checkpoints and their training
state, GGUF, ARPA and binary n-gram models) are cut short, overwritten in a few bytes, given huge
length or count fields, or (JSON) a value of another type, and the command that reads them must end
with success or a clear error (exit code 0 or 1) — not a panic, an abort on allocation, a signal or a
hang — within a 4 GiB address space.

LMKIT_FUZZ_ROUNDS (default 120) and LMKIT_FUZZ_SEED (default 0) run a longer or another campaign;
a failing case's files are kept under pytest's temporary directory and named in the message."""
import contextlib
import copy
import http.client
import json
import math
import os
import pathlib
import random
import re
import shutil
import stat
import struct
import subprocess
import time

import pytest

from test_hostile import BIN, MEMORY, SIGNS, cap, run

ROUNDS = int(os.environ.get("LMKIT_FUZZ_ROUNDS", "120"))
SEED = int(os.environ.get("LMKIT_FUZZ_SEED", "0"))


def mutate_bytes(data, rng):
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 and len(data) > 1:
        return bytes(data[:rng.randrange(len(data))])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2 and len(data) >= 8:
        # Header fields (lengths, counts, offsets) sit near the start.
        i = rng.randrange(min(len(data) - 8, 4096) + 1)
        value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1, rng.randrange(2**64)])
        data[i:i + 8] = struct.pack("<Q", value)
        return bytes(data)
    if kind == 3 and len(data) >= 4:
        i = rng.randrange(min(len(data) - 4, 4096) + 1)
        data[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 255, 2**31 - 1, 2**31, 2**32 - 1]))
        return bytes(data)
    i = rng.randrange(len(data) + 1)
    return bytes(data[:i]) + rng.randbytes(rng.randint(1, 64)) + bytes(data[i:])


ODD = [0, -1, 1, 2**31, 2**32, 2**53, 10**12, -10**12, 1e308, 0.5, "x", None, [], {}, True, ""]


def mutate_json(obj, rng):
    """One value somewhere in `obj` replaced by an odd one (or its key removed)."""
    paths = []

    def walk(o, p):
        paths.append(p)
        items = o.items() if isinstance(o, dict) else enumerate(o[:50]) if isinstance(o, list) else ()
        for k, v in items:
            walk(v, p + [k])

    walk(obj, [])
    path = rng.choice(paths[1:] or paths)
    if not path:
        return rng.choice(ODD)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(ODD)
    return obj


def mutate_file(path, rng):
    """Mutates `path` in place; says how."""
    data = path.read_bytes()
    if path.suffix == ".json" and rng.random() < 0.7:
        try:
            path.write_text(json.dumps(mutate_json(json.loads(data), rng)))
            return "json value"
        except ValueError:
            pass
    if path.suffix in (".arpa", ".jsonl") and rng.random() < 0.5:
        lines = data.decode("utf-8", "replace").split("\n")
        i = rng.randrange(len(lines))
        lines[i] = rng.choice(["", "x" * rng.randint(1, 10), "\t", "-1e999 a b", lines[i][:len(lines[i]) // 2]])
        path.write_text("\n".join(lines))
        return f"line {i + 1}"
    path.write_bytes(mutate_bytes(data, rng))
    return "bytes"


def lmkit(d, *args):
    p = subprocess.run([BIN, *map(str, args)], cwd=d, capture_output=True, text=True)
    assert p.returncode == 0, (args, p.stderr[-2000:])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """What lmkit writes, made once: tokenizer, shards, a GPT-2 and a Llama run, GGUF files, n-gram models."""
    d = tmp_path_factory.mktemp("made")
    words = "the cat sat on a mat and the dog ran to the old red barn while birds sang".split()
    rng = random.Random(1)
    (d / "c.txt").write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(600)))
    (d / "t.txt").write_text("the cat sat on the mat\nthe dog ran\n")
    lmkit(d, "tokenizer", "train", "--input", "c.txt", "--vocab-size", "300", "--output", "tok")
    lmkit(d, "tokenizer", "encode", "--tokenizer", "tok", "--input", "c.txt", "--shards", "shards")
    data = f'[data]\ntrain = "{d}/shards"\ntokenizer = "{d}/tok"\n'
    train = '[train]\nout_dir = "{}"\nseq_len = 16\nbatch_size = 4\nmax_steps = 2\n'
    (d / "gpt.toml").write_text('[model]\nmodel_type = "gpt2"\nn_positions = 32\nn_embd = 32\nn_layer = 2\n'
                                'n_head = 2\n' + data + train.format("gpt"))
    # 256 wide: whole blocks of the K-quants.
    (d / "llama.toml").write_text('[model]\nmodel_type = "llama"\nhidden_size = 256\nintermediate_size = 256\n'
                                  'num_hidden_layers = 1\nnum_attention_heads = 4\nnum_key_value_heads = 2\n'
                                  'max_position_embeddings = 512\n' + data + train.format("llama"))
    lmkit(d, "train", "--config", "gpt.toml")
    lmkit(d, "train", "--config", "llama.toml")
    for q in ("q8_0", "q4_k", "q6_k"):
        lmkit(d, "quantize", "llama", f"{q}.gguf", "--type", q)
    lmkit(d, "ngram", "train", "--order", "3", "--discount-fallback", "--input", "c.txt", "--output", "m.arpa")
    lmkit(d, "ngram", "train", "--order", "3", "--discount-fallback", "--input", "c.txt", "--output", "m.lmkb")
    return d


def test_outputs_get_the_usual_permissions(made):
    """Every file and directory the commands wrote (tokenizer, shards, checkpoints, GGUF and n-gram
    models) is made as any other file is, 0666 or 0777 less the umask: they were made with a
    temporary file's 0600 (0700 for directories), unreadable to every other user."""
    mask = os.umask(0)
    os.umask(mask)
    paths = list(made.rglob("*"))
    assert len(paths) > 30, paths
    wrong = [f"{p.relative_to(made)}: {stat.S_IMODE(p.lstat().st_mode):o}" for p in paths
             if stat.S_IMODE(p.lstat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask]
    assert not wrong, f"umask {mask:o}:\n" + "\n".join(wrong)


def generate(model):
    return ["generate", "--model", model, "--prompt", "the cat", "--max-tokens", "3", "--greedy"]


def resume(work):
    return ["train", "--config", work / "run.toml", "--resume", "--set", f'train.out_dir="{work}"',
            "--set", "train.max_steps=3"]


# (name, what is copied, files within it that are mutated, the command that reads the copy)
TARGETS = [
    ("tokenizer", "tok", ["tokenizer.json", "tokenizer_config.json"],
     lambda w: ["tokenizer", "encode", "--tokenizer", w, "--input", "t.txt", "--shards", f"{w}.out"]),
    ("checkpoint", "gpt/ckpt-000002",
     ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"],
     generate),
    ("llama checkpoint", "llama/ckpt-000002", ["model.safetensors", "config.json"], generate),
    ("training state", "gpt",
     ["ckpt-000002/trainer_state/state.json", "ckpt-000002/trainer_state/optimizer.safetensors",
      "ckpt-000002/model.safetensors", "latest", "metrics.jsonl"], resume),
    ("gguf q8_0", "q8_0.gguf", [""], generate),
    ("gguf q4_k", "q4_k.gguf", [""], generate),
    ("gguf q6_k", "q6_k.gguf", [""], generate),
    ("arpa", "m.arpa", [""], lambda w: ["ngram", "ppl", "-m", w, "--input", "t.txt"]),
    ("lmkb", "m.lmkb", [""], lambda w: ["ngram", "ppl", "-m", w, "--input", "t.txt"]),
    ("shards", "shards", ["tokens-00000.bin", "tokens-00000.json"],
     lambda w: ["train", "--config", "gpt.toml", "--set", f'data.train="{w}"', "--set", f'train.out_dir="{w}.run"',
                "--set", "train.max_steps=1"]),
]


def test_each_target_reads_its_unmutated_files(made, tmp_path):
    """The commands succeed on what lmkit wrote: the errors below come from the mutations."""
    for name, source, _, command in TARGETS:
        work = tmp_path / name.replace(" ", "-")
        src = made / source
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work)
        p = run(command(work), made)
        assert p.returncode == 0, (name, p.stderr[-2000:])


def test_mutated_files_end_in_success_or_a_clear_error(made, tmp_path):
    rng = random.Random(SEED)
    failures = []
    for i in range(ROUNDS):
        name, source, files, command = rng.choice(TARGETS)
        work = tmp_path / f"{i}-{name.replace(' ', '-')}"
        src = made / source
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work)
        inside = rng.choice(files)
        how = mutate_file(work / inside if inside else work, rng)
        try:
            p = run(command(work), made)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, err = "timeout", ""
        if rc not in (0, 1) or any(s in err for s in SIGNS):
            failures.append(f"{work} ({name}: {inside or source}, {how}): exit {rc}\n{err[-1500:]}")
            continue
        for leftover in (work, f"{work}.out", f"{work}.run"):
            shutil.rmtree(leftover, ignore_errors=True) if os.path.isdir(leftover) else None
        if os.path.isfile(work):
            os.unlink(work)
    assert not failures, f"{len(failures)} of {ROUNDS} cases (seed {SEED}):\n" + "\n".join(failures)


@contextlib.contextmanager
def serving(made, tmp_path, preexec_fn=None):
    """`lmkit serve` on the Llama run: (host, port, its log's path, the process)."""
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([BIN, "serve", made / "llama", "--port", "0", "--db", tmp_path / "db.sqlite"],
                            stderr=log, stdout=log, preexec_fn=preexec_fn)
    try:
        line = None
        for _ in range(600):
            line = next((l for l in log_path.read_text().splitlines() if "serving" in l), None)
            if line or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert line, log_path.read_text()
        host, port = line.split("on http://")[1].split()[0].split(":")
        yield host, int(port), log_path, proc
        assert proc.poll() is None, log_path.read_text()[-3000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def post(host, port, path, data):
    """(status, body) of a POST, or (the exception's text, b"") where the connection failed."""
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException) as e:
        return repr(e), b""
    finally:
        c.close()


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}},
          "required": ["name"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# Requests of each kind the API takes; each round sends one with one to three values changed.
REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hi there"}], "max_tokens": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                              "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True},
                              "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "n": 2, "seed": 3,
                              "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "weather"}}, "max_tokens": 12}),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 5, "stop": ["\n", "the"], "logprobs": 2, "echo": True}),
    ("/v1/completions", {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "frequency_penalty": 0.5,
                         "presence_penalty": 0.1, "logit_bias": {"5": -100, "7": 3}}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5, "stream": True, "n": 2, "temperature": 1.0, "top_p": 0.9,
                         "response_format": {"type": "regex", "regex": "(19|20)[0-9]{2}"}}),
]


def test_mutated_requests_get_an_answer_or_a_4xx(made, tmp_path):
    """The server answers every mutated request with a 200 or a 4xx (never a 5xx or a dropped
    connection), stays up, and its log has no panic."""
    with serving(made, tmp_path) as (host, port, log_path, proc):
        def send(path, data):
            return post(host, port, path, data)

        for path, request in REQUESTS:
            status, answer = send(path, json.dumps(request).encode())
            assert status == 200, (path, request, answer[:500])
        rng = random.Random(SEED)
        failures = []
        for i in range(max(ROUNDS, 100)):
            path, request = rng.choice(REQUESTS)
            body = copy.deepcopy(request)
            for _ in range(rng.randint(1, 3)):
                body = mutate_json(body, rng)
            data = json.dumps(body).encode()
            if rng.random() < 0.1:
                data = mutate_bytes(data, rng)
            status, answer = send(path, data)
            if not isinstance(status, int) or status >= 500:
                failures.append(f"{i}: {path} {data[:300]!r} -> {status} {answer[:300]!r}")
            assert proc.poll() is None, f"the server exited at request {i}: {path} {data[:300]!r}"
        assert not failures, "\n".join(failures)
    text = log_path.read_text()
    assert "panicked" not in text, text[-3000:]


# Keys whose large values only ask for a long run (more steps, micro-batches or validation batches).
LONG = {"train.max_steps", "train.grad_accum", "train.eval_batches"}
ODD_SETTINGS = ["0", "-1", "nan", "inf", str(10**12), str(2**63 - 1), '"x"', "true"]


@pytest.mark.parametrize("key", [
    "model.n_positions", "model.n_embd", "model.n_layer", "model.n_head", "model.n_inner", "model.vocab_size",
    "train.seq_len", "train.batch_size", "train.grad_accum", "train.max_steps", "train.lr", "train.min_lr",
    "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.eps", "train.beta1", "train.beta2",
    "train.eval_every", "train.eval_batches", "train.save_every", "train.log_every", "train.max_time",
    "train.keep_checkpoints", "data.val_fraction"])
def test_odd_settings_end_in_success_or_a_clear_error(made, tmp_path, key):
    """`lmkit train --set KEY=VALUE` with zero, negative, NaN, infinite, huge and mistyped values:
    a run (of two steps) or an error naming the field, never a panic, an abort or a hang."""
    for value in ODD_SETTINGS:
        if key in LONG and value in (str(10**12), str(2**63 - 1), "inf"):
            continue
        out = tmp_path / f"out-{ODD_SETTINGS.index(value)}"
        p = run(["train", "--config", "gpt.toml", "--set", f'train.out_dir="{out}"', "--set", f"{key}={value}"],
                made)
        assert p.returncode in (0, 1) and not any(s in p.stderr for s in SIGNS), (key, value, p.stderr[-2000:])
        if p.returncode == 0:
            # A run that ends is one whose losses are numbers.
            for line in (out / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                for name in ("loss", "val_loss"):
                    if record.get(name) is not None:
                        assert math.isfinite(record[name]), (key, value, line)


# Commands whose options are given odd values: each runs as written on `made`'s files (its outputs
# relative: they go to the case's own directory).
COMMANDS = [
    lambda d: ["generate", "--model", d / "gpt/ckpt-000002", "--prompt", "the cat", "--max-tokens", "3"],
    lambda d: ["generate", "--model", d / "q8_0.gguf", "--prompt", "the cat", "--max-tokens", "3"],
    lambda d: ["eval", "ppl", "--model", d / "gpt/ckpt-000002", "--input", d / "t.txt"],
    lambda d: ["eval", "rank", "--model", d / "gpt/ckpt-000002", "--input", d / "t.txt"],
    lambda d: ["model", "logits", "--model", d / "gpt/ckpt-000002", "--ids", "1,2"],
    lambda d: ["tokenizer", "train", "--input", d / "c.txt", "--vocab-size", "300", "--output", "tok"],
    lambda d: ["tokenizer", "encode", "--tokenizer", d / "tok", "--input", d / "t.txt", "--shards", "shards"],
    lambda d: ["tokenizer", "stats", "--tokenizer", d / "tok", "--input", d / "t.txt"],
    lambda d: ["ngram", "train", "--order", "3", "--discount-fallback", "--input", d / "c.txt", "--output", "m.arpa"],
    lambda d: ["ngram", "convert", d / "m.arpa", "m.lmkb"],
    lambda d: ["ngram", "ppl", "--model", d / "m.lmkb", "--input", d / "t.txt"],
    lambda d: ["data", "prepare", "--input", d / "c.txt", "--output", "prepared"],
    lambda d: ["quantize", d / "llama/ckpt-000002", "q.gguf", "--type", "q8_0"],
    lambda d: ["train", "--config", d / "gpt.toml", "--set", 'train.out_dir="run"'],
]
ODD_FLAGS = ["0", "-1", "nan", "inf", "1e308", "4294967296", "18446744073709551616", "9" * 40, "x", "", "-0.5",
             "1,2", ".", ".."]
# Options whose large values only ask for a long run.
LONG_FLAGS = {"--max-steps", "--max-time"}


def options(args):
    """The options of the command `args` runs that take a value, as its --help lists them."""
    words = [a for a in args[:2] if isinstance(a, str) and not a.startswith("-")]
    text = subprocess.run([BIN, *words, "--help"], capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+) <", text, re.M)))


def test_odd_option_values_end_in_success_or_a_clear_error(made, tmp_path):
    """Commands given odd values for an option (zero, negative, NaN, infinite, huge, mistyped,
    empty, a directory; device files where this may make them): success, a clear error or a
    usage error (exit code 0, 1 or 2), never a panic, an abort or a hang; and a device file given
    for an option stays a device file."""
    devices = tmp_path / "dev"
    devices.mkdir()
    try:
        os.mknod(devices / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(devices / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        pass
    each = [(c, o) for c in COMMANDS for o in options(c(made))]
    cases = [(c, o, v) for c, o in each for v in ODD_FLAGS
             if not (o in LONG_FLAGS and v in ("inf", "1e308", "4294967296", "18446744073709551616", "9" * 40))]
    assert len(cases) > 500, len(cases)
    rng = random.Random(SEED)
    # Every option given each device file; a sample of the rest.
    cases = [(c, o, str(d)) for c, o in each for d in sorted(devices.iterdir())] + \
        rng.sample(cases, min(len(cases), ROUNDS * 2))
    failures = []
    for i, (command, option, value) in enumerate(cases):
        args = command(made)
        if option in args:
            del args[args.index(option):args.index(option) + 2]
        # (`=`: a value such as -1 is not taken for an option.)
        args.append(f"{option}={value}")
        work = tmp_path / str(i) / "w"
        work.mkdir(parents=True)
        try:
            p = run(args, work)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, err = "timeout", ""
        if rc not in (0, 1, 2) or any(s in err for s in SIGNS):
            failures.append(f"{args}: exit {rc}\n{err[-1500:]}")
        for d in devices.iterdir():
            assert stat.S_ISCHR(d.lstat().st_mode), f"{args} replaced {d}"
        shutil.rmtree(tmp_path / str(i), ignore_errors=True)
    assert not failures, f"{len(failures)} cases (seed {SEED}):\n" + "\n".join(failures)


def ref_chain(n):
    """A schema whose `$ref`s follow each other n deep."""
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def test_deep_schemas_are_compiled_or_refused(made, tmp_path):
    """A chain of 3,000 `$ref`s overflowed the stack of the thread compiling it — `lmkit generate`'s
    main thread, and at 2,000 a server's worker (one request aborted the server). Now such a schema
    is compiled on a thread with room, more than 4,096 `$ref`s are refused (400), and a grammar the
    parser cannot take is refused (400) too."""
    (tmp_path / "deep.json").write_text(json.dumps(ref_chain(3000)))
    p = run(["generate", "--model", "llama", "--prompt", "the", "--max-tokens", "2", "--json-schema",
             tmp_path / "deep.json"], made)
    assert p.returncode == 0, p.stderr[-2000:]
    (tmp_path / "deeper.json").write_text(json.dumps(ref_chain(5000)))
    check_error = run(["generate", "--model", "llama", "--prompt", "the", "--max-tokens", "2", "--json-schema",
                       tmp_path / "deeper.json"], made)
    assert check_error.returncode == 1 and "at most 4096" in check_error.stderr, check_error.stderr[-2000:]
    cycle = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    with serving(made, tmp_path) as (host, port, log_path, proc):
        for schema, want in [(ref_chain(2000), 200), (ref_chain(5000), 400), (cycle, 400)]:
            body = {"prompt": "the", "max_tokens": 2,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
            status, answer = post(host, port, "/v1/completions", json.dumps(body).encode())
            assert status == want, (status, answer[:500])


def test_a_grammar_that_fails_while_generating_is_the_client_s_error(made, tmp_path):
    """A grammar the parser takes at its first token but not at its second (after "x", a row of
    20,000 alternatives: past llguidance's limit of 2,000 items) answered 500 "generation failed;
    see the server log". Now it is a 400 naming `response_format` with the engine's reason (an
    error event where it streams), and `lmkit generate` says the reason without the parser's state."""
    lark = 'start: "x" big\nbig: ' + " | ".join(f'"w{i}"' for i in range(20000)) + "\n"
    (tmp_path / "g.lark").write_text(lark)
    p = run(["generate", "--model", "llama", "--prompt", "the", "--max-tokens", "4", "--grammar",
             tmp_path / "g.lark"], made)
    assert p.returncode == 1 and "Current row has" in p.stderr, p.stderr[-2000:]
    assert "<state>" not in p.stderr and len(p.stderr) < 1000, p.stderr[-2000:]
    with serving(made, tmp_path) as (host, port, log_path, proc):
        body = {"prompt": "the", "max_tokens": 4, "response_format": {"type": "lark", "lark": lark}}
        status, answer = post(host, port, "/v1/completions", json.dumps(body).encode())
        assert status == 400, (status, answer[:500])
        error = json.loads(answer)["error"]
        assert error["param"] == "response_format" and "Current row has" in error["message"], error
        assert "<state>" not in error["message"], error
        status, answer = post(host, port, "/v1/completions", json.dumps({**body, "stream": True}).encode())
        assert status == 200, (status, answer[:500])
        events = [json.loads(line[6:]) for line in answer.decode().splitlines()
                  if line.startswith("data: {")]
        assert any(e.get("error", {}).get("param") == "response_format" for e in events), events
        assert answer.decode().rstrip().endswith("data: [DONE]"), answer[-200:]
        assert proc.poll() is None


def test_tuning_inputs_that_are_devices_or_print_without_end_are_clear_errors(made, tmp_path):
    """A DPO `reference` naming a device was hashed without end (/dev/zero: a hang); a GRPO reward
    command's output was read whole (one printing without end aborted on allocation) and its exit
    status ignored. Now each is an error that says what is wrong."""
    rows = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"}] * 4
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": "the dog"}) + "\n" for _ in range(4)))
    train = '[train]\nout_dir = "out"\nmax_steps = 1\nbatch_size = 2\nseq_len = 32\n[lora]\nr = 2\nalpha = 4\n'
    base = f'base = "{made}/llama"\n'
    device = tmp_path / "zero"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        device = pathlib.Path("/dev/zero")  # read, never written
    rl = base + f'[data]\nprompts = "{tmp_path}/prompts.jsonl"\n[rl]\ngroup_size = 2\nmax_new_tokens = 2\n'
    cases = [
        (["dpo"], base + f'reference = "{device}"\n[data]\ntrain = "{tmp_path}/pref.jsonl"\n',
         "not a model directory or a GGUF file"),
        (["rl"], rl + '[reward]\ncommand = "cat > /dev/null; head -c 100000000 /dev/zero"\n',
         "printed more than 16 MiB"),
        (["rl"], rl + '[reward]\ncommand = "cat > /dev/null; echo 1; echo it broke >&2; exit 3"\n',
         "exit status: 3:\nit broke"),
    ]
    for i, (command, config, want) in enumerate(cases):
        work = tmp_path / str(i)
        work.mkdir()
        (work / "c.toml").write_text(config + train)
        p = run([*command, "--config", "c.toml"], work)
        assert p.returncode == 1 and want in p.stderr, (config, p.returncode, p.stderr[-2000:])
        assert len(p.stderr) < 10_000 and not any(s in p.stderr for s in SIGNS), (config, p.stderr[-2000:])
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_the_servers_caches_fit_within_its_memory_limit(made, tmp_path):
    """The KV caches' default budget is sized by the memory the server may still take: under a
    4 GiB address-space limit (as in a container with a memory limit) it budgeted half the
    machine's `MemAvailable` (11.5 GiB on a 24 GiB machine) and would abort on allocation before
    refusing a sequence."""
    with serving(made, tmp_path, preexec_fn=cap) as (host, port, log_path, proc):
        line = next(l for l in log_path.read_text().splitlines() if "KV caches: up to" in l)
    kv, prefix = (float(x) for x in re.findall(r"up to ([0-9.]+) GiB", line))
    assert 0 < kv + prefix < MEMORY / (1 << 30), line
