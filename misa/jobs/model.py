"""A small LLaMA-architecture causal LM in plain torch (RMSNorm, rotary positions, SwiGLU), for the
main job and the experiments: no download, no transformers needed. Parameter names follow LLaMA's
(model.layers.N.self_attn.q_proj, ...), so MISA partitions it exactly as it does a real LLaMA."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        # Checked here so that a bad --config is a message before training, not a crash at step 1.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into num_heads {self.num_heads} heads of an "
                "even size (rotary positions rotate pairs)"
            )

    def to_dict(self):
        return asdict(self)


SIZES = {
    "tiny": LlamaConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4),
    "small": LlamaConfig(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4),
    "base": LlamaConfig(hidden_size=256, intermediate_size=688, num_layers=8, num_heads=8),
    "medium": LlamaConfig(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8),
    "large": LlamaConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q = rotary(self.q_proj(x).view(shape).transpose(1, 2), cos, sin)
        k = rotary(self.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        head_dim = cfg.hidden_size // cfg.num_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Activation checkpointing per block (the Hugging Face name): each block keeps only its input and
        is recomputed in backward. Non-reentrant (`torch.utils.checkpoint(use_reentrant=False)`), so blocks
        behind a frozen embedding still receive gradients; a reentrant one would give them none."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            raise ValueError(
                "gradient_checkpointing_kwargs: use_reentrant=True gives blocks behind a frozen "
                "embedding no gradients; this model checkpoints non-reentrantly"
            )
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def _init(self, module):
        # GPT-2/LLaMA-style init: N(0, 0.02), residual projections scaled by depth.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if (
                isinstance(module, nn.Linear)
                and module.out_features == self.config.hidden_size
                and module.in_features != self.config.hidden_size
            ):
                std /= math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, ids):
        t = ids.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:t].to(self.lm_head.weight.dtype), self.rope_sin[:t].to(self.lm_head.weight.dtype)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def loss(self, batch):
        """Next-token cross-entropy of a [batch, seq+1] tensor of token ids."""
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
