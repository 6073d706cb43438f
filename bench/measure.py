"""Running a benchmark's child process and measuring it, for the bench scripts."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_measured(cmd, env=None):
    """Runs cmd in a child process (through a small Python parent that reads the child's resource
    usage): returns (stdout, stderr, peak RSS in MB, wall time in s). Exits naming the command if
    it fails."""
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "w = time.perf_counter() - t\n"
            "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'WALL', w,"
            " file=sys.stderr)\n"
            "sys.exit(p.returncode)")
    p = subprocess.run([sys.executable, "-c", code, *map(str, cmd)], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{[str(c) for c in cmd[:3]]} failed: {p.stderr[-2000:]}")
    m = re.search(r"PEAK_RSS_KB (\d+) WALL ([0-9.]+)", p.stderr)
    return p.stdout, p.stderr, int(m.group(1)) / 1024, float(m.group(2))


def run_config(tmp, model_toml, seq_len, batch_size, max_steps, device, extra_train=""):
    """A `lmkit train` config for the benches: the model's TOML lines, data from `tmp/shards` and
    `tmp/tok`, output into `tmp/out`, every step logged, no evaluation or checkpoints."""
    return f"""
[model]
{model_toml}
[data]
train = "{tmp}/shards"
tokenizer = "{tmp}/tok"
[train]
out_dir = "{tmp}/out"
seq_len = {seq_len}
batch_size = {batch_size}
max_steps = {max_steps}
warmup_steps = 1
eval_every = 0
save_every = 0
log_every = 1
device = "{device}"
{extra_train}"""


def run_checked(cmd, **kw):
    """Runs cmd (its output captured as text); exits naming it, with its stderr's end, if it fails."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if p.returncode:
        sys.exit(f"{[str(c) for c in cmd][:4]} failed: {p.stderr[-3000:]}")
    return p


def tokenized_corpus(lm, tmp, vocab):
    """A tokenizer of `vocab` tokens at tmp/tok and the bundled English corpus's shards at
    tmp/shards (what run_config's data section reads), made with the lmkit binary `lm`."""
    run_checked([lm, "tokenizer", "train", "--input", ROOT / "data/en", "--vocab-size", vocab, "--output",
                 tmp / "tok"])
    run_checked([lm, "tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", ROOT / "data/en",
                 "--shards", tmp / "shards"])


def served_url(proc):
    """The http://host:port an `lmkit serve` child (stderr piped, as text) says it serves on, from
    its first line; where that line says otherwise, the server is stopped and the bench exits
    with its output."""
    line = proc.stderr.readline()
    if "serving" not in line:
        proc.terminate()  # first: reading the rest of its output waits for it to end
        raise SystemExit(f"server did not start: {line}{proc.communicate(timeout=10)[1]}")
    return "http://" + line.split("on http://")[1].split()[0]
