"""Fill-in-the-middle (`lmkit generate --suffix`, the completions endpoint's `suffix`) against
llama.cpp. On a GGUF file of a Llama whose vocabulary has Qwen2.5-Coder's fill-in-the-middle tokens,
lmkit takes the tokens llama.cpp takes (`llama_vocab_fim_pre/suf/mid`), lays the prompt out as
llama.cpp's `/infill` does for such a vocabulary (the start token where the vocabulary adds one, then
<PRE> prefix <SUF> suffix <MID>), and decodes greedily the tokens llama.cpp decodes from it, ending
where llama.cpp's end-of-generation tokens end it (`<|fim_pad|>` among them). Through the server the
openai client's `suffix` gives the same text; a model without the tokens gets a 400 naming `suffix`."""
import os
import pathlib
import subprocess

import llama_cpp
import openai
import pytest
from conftest import SERVER_KEY

BIN = os.environ.get("LMKIT_BIN", str(pathlib.Path(__file__).resolve().parents[2] / "target" / "release" / "lmkit"))
FIM = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
CODE = ("def add(a, b):\n    return a + b\n\n"
        "def area(r):\n    pi = 3.14159\n    return pi * r * r\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n")
CASES = [("def area(r):\n    ", "\n    return pi * r * r\n"), ("class Point:\n", ""), ("", "    return a + b\n")]


@pytest.fixture(scope="module")
def coder(lmkit, tmp_path_factory):
    """A Llama trained a little on code by lmkit, its tokenizer holding the fill-in-the-middle
    tokens, written as a Q8_0 GGUF file by `lmkit quantize`."""
    tmp = tmp_path_factory.mktemp("fim")
    corpus = tmp / "code.txt"
    corpus.write_text(CODE * 60)
    specials = [a for t in FIM for a in ("--special", t)]
    lmkit("tokenizer", "train", "--input", corpus, "--vocab-size", "320", *specials, "--output", tmp / "tok")
    lmkit("tokenizer", "encode", "--tokenizer", tmp / "tok", "--input", corpus, "--shards", tmp / "shards")
    (tmp / "run.toml").write_text(
        '[model]\nmodel_type = "llama"\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 2\n'
        'num_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 128\n'
        f'[data]\ntrain = "{tmp}/shards"\ntokenizer = "{tmp}/tok"\nval_fraction = 0.0\n'
        f'[train]\nout_dir = "{tmp}/out"\nseq_len = 32\nbatch_size = 4\nmax_steps = 30\nwarmup_steps = 2\n'
        'eval_every = 0\nsave_every = 30\nlr = 0.01\n')
    lmkit("train", "--config", tmp / "run.toml")
    gguf = tmp / "coder.gguf"
    lmkit("quantize", tmp / "out", gguf, "--type", "q8_0")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_threads=2, verbose=False)
    return {"gguf": gguf, "llm": llm, "tmp": tmp}


def infill(llm, prefix, suffix, n=24):
    """llama.cpp's prompt for the middle between `prefix` and `suffix` (its `/infill` layout for a
    vocabulary without repository tokens) and the greedy tokens it decodes, up to an
    end-of-generation token."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False, special=False)  # noqa: E731
    ids = ([llama_cpp.llama_vocab_fim_pre(vocab)] + tok(prefix) + [llama_cpp.llama_vocab_fim_suf(vocab)] + tok(suffix)
           + [llama_cpp.llama_vocab_fim_mid(vocab)])
    if llama_cpp.llama_vocab_get_add_bos(vocab):
        ids = [llama_cpp.llama_vocab_bos(vocab)] + ids
    llm.reset()
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(vocab, t) or len(out) == n:
            break
        out.append(t)
    return ids, out


def test_fim_tokens_are_llama_cpp_s(lmkit, coder):
    vocab = llama_cpp.llama_model_get_vocab(coder["llm"].model)
    ours = [int(lmkit("tokenizer", "encode", "--tokenizer", coder["gguf"], stdin=t + "\n")) for t in FIM]
    theirs = [f(vocab) for f in (llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_mid,
                                 llama_cpp.llama_vocab_fim_suf, llama_cpp.llama_vocab_fim_pad)]
    assert ours == theirs
    assert llama_cpp.llama_vocab_is_eog(vocab, theirs[3])


@pytest.mark.parametrize("prefix,suffix", CASES)
def test_generate_suffix_decodes_llama_cpp_s_tokens(lmkit, coder, prefix, suffix):
    _, want = infill(coder["llm"], prefix, suffix)
    got = lmkit("generate", "--model", coder["gguf"], "--prompt", prefix, "--suffix", suffix, "--greedy",
                "--max-tokens", "24", "--ids")
    assert [int(i) for i in got.split()] == want


def test_a_middle_ends_at_fim_pad(lmkit, coder):
    """With `<|fim_pad|>` made the likeliest token at once (a bias through the server), the middle
    is empty and ends with `stop`, as llama.cpp ends it at an end-of-generation token."""
    pad = int(lmkit("tokenizer", "encode", "--tokenizer", coder["gguf"], stdin="<|fim_pad|>\n"))
    with serving(coder["gguf"], coder["tmp"]) as c:
        r = c.completions.create(model="coder", prompt=CASES[0][0], suffix=CASES[0][1], max_tokens=8, temperature=0,
                                 logit_bias={str(pad): 100})
        assert (r.choices[0].text, r.choices[0].finish_reason) == ("", "stop")


class serving:
    """`lmkit serve` on `model`, as an openai client."""

    def __init__(self, model, tmp):
        self.model, self.tmp = model, tmp

    def __enter__(self):
        self.proc = subprocess.Popen([BIN, "serve", self.model, "--port", "0", "--api-key", SERVER_KEY,
                                      "--model-name", "coder", "--db", self.tmp / "db.sqlite"],
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        while line and "serving" not in line:
            line = self.proc.stderr.readline()
        assert "serving" in line, line
        base = line.split("on http://")[1].split()[0]
        return openai.OpenAI(base_url=f"http://{base}/v1", api_key=SERVER_KEY, max_retries=0)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_server_suffix_answers_llama_cpp_s_middle(coder):
    llm = coder["llm"]
    with serving(coder["gguf"], coder["tmp"]) as c:
        for prefix, suffix in CASES:
            ids, want = infill(llm, prefix, suffix)
            r = c.completions.create(model="coder", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
            assert r.choices[0].text == llm.detokenize(want).decode(), (prefix, suffix)
            assert r.usage.prompt_tokens == len(ids)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="coder", prompt=[1, 2, 3], suffix="x", max_tokens=2)
        assert e.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="coder", prompt="a", suffix="x", echo=True, max_tokens=2)
        assert e.value.body["param"] == "suffix"


def test_a_model_without_fim_tokens_refuses_suffix(server):
    c = openai.OpenAI(base_url=server["url"], api_key=SERVER_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="the cat", suffix=" the mat", max_tokens=4)
    assert e.value.body["param"] == "suffix" and "fill-in-the-middle" in e.value.body["message"], e.value.body
    p = subprocess.run([BIN, "generate", "--model", server["model"], "--prompt", "the cat", "--suffix", " the mat"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "no fill-in-the-middle tokens" in p.stderr, p.stderr
