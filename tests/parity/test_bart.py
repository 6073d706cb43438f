"""The encoder-decoder Transformer against transformers: a random-initialised
BartForConditionalGeneration saved with save_pretrained gives the same decoder logits in lmkit."""
import json

import numpy as np
import torch
from transformers import BartConfig, BartForConditionalGeneration

ATOL = 1e-4


def build(tmp_path):
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=301, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                     dropout=0, attention_dropout=0, activation_dropout=0, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2)
    model = BartForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape) * 0.1)
    model.eval().save_pretrained(tmp_path / "bart", safe_serialization=True)
    return model, tmp_path / "bart"


def test_bart_logits_match(lmkit, tmp_path):
    model, path = build(tmp_path)
    g = torch.Generator().manual_seed(5)
    src = [int(x) for x in torch.randint(3, 301, (13,), generator=g)]
    tgt = [2] + [int(x) for x in torch.randint(3, 301, (9,), generator=g)]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([tgt])).logits[0].numpy()
    got = np.array(json.loads(lmkit("model", "logits", "--model", path, "--source-ids", ",".join(map(str, src)),
                                    "--ids", ",".join(map(str, tgt)))), dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
