"""RNN and LSTM language models against PyTorch: a model trained by lmkit loads into
torch.nn.Embedding + torch.nn.RNN/LSTM + torch.nn.Linear (same tensor names) and gives the same
logits, all at once and token by token through lmkit's recurrent state."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ATOL = 1e-4


class Ref(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        e = cfg.get("embedding_size") or cfg["hidden_size"]
        self.embedding = torch.nn.Embedding(cfg["vocab_size"], e)
        kind = torch.nn.LSTM if cfg["cell"] == "lstm" else torch.nn.RNN
        self.rnn = kind(e, cfg["hidden_size"], num_layers=cfg["num_layers"], batch_first=True)
        self.lm_head = torch.nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, ids):
        out, _ = self.rnn(self.embedding(ids))
        return self.lm_head(out)


@pytest.mark.parametrize("cell,tied", [("rnn", False), ("lstm", False), ("lstm", True)])
def test_rnn_and_lstm_logits_match_pytorch(tiny_model, tmp_path, cell, tied):
    run, tmp = tiny_model["run"], tiny_model["tmp"]
    emb = "" if tied else "embedding_size = 16\n"
    (tmp_path / "run.toml").write_text(
        f'[model]\nmodel_type = "lmkit_rnn"\ncell = "{cell}"\nhidden_size = 24\nnum_layers = 2\n{emb}'
        f'tie_word_embeddings = {str(tied).lower()}\n'
        f'[data]\ntrain = "{tmp}/shards"\ntokenizer = "{tmp}/tok"\nval_fraction = 0.0\n'
        f'[train]\nout_dir = "{tmp_path}/out"\nseq_len = 16\nbatch_size = 4\nmax_steps = 3\nwarmup_steps = 1\n'
        f'eval_every = 0\nsave_every = 3\nlr = 0.01\n')
    run("train", "--config", tmp_path / "run.toml")
    ckpt = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    cfg = json.loads((ckpt / "config.json").read_text())
    ref = Ref(cfg)
    weights = load_file(ckpt / "model.safetensors")
    if tied:
        weights["lm_head.weight"] = weights["embedding.weight"]
    ref.load_state_dict(weights, strict=True)
    ids = [int(x) for x in torch.randint(0, cfg["vocab_size"], (21,), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0].numpy()
    for extra in ([], ["--incremental"]):
        got = np.array(json.loads(run("model", "logits", "--model", tmp_path / "out", "--ids", ",".join(map(str, ids)),
                                      *extra)), dtype=np.float32)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < ATOL, (extra, np.abs(got - want).max())
