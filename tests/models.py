"""Small models for the optimizer tests: LLaMA-style names without needing transformers."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, ff, bias=False)
        self.mlp.up_proj = nn.Linear(d, ff, bias=False)
        self.mlp.down_proj = nn.Linear(ff, d, bias=True)

    def forward(self, x):
        h = self.input_layernorm(x)
        a = self.self_attn
        att = torch.softmax(a.q_proj(h) @ a.k_proj(h).transpose(-1, -2) / h.shape[-1] ** 0.5, dim=-1)
        x = x + a.o_proj(att @ a.v_proj(h))
        m = self.mlp
        return x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=32, d=16, ff=24, layers=3):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def tiny_lm(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw).to(dtype)
