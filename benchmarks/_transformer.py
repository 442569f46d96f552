"""A compact GPT-style decoder built from a config (random weights, nothing downloaded), for benchmarks and tests.

Pre-LayerNorm blocks (causal self-attention, GELU MLP), learned position embeddings, an optionally tied
output embedding. Attention is written with plain ops (``softmax(q k^T / sqrt(d) + mask) v``) by default, or
with ``F.scaled_dot_product_attention`` (``attention="sdpa"``). On CPU (torch 2.13) SDPA dispatches to
``_scaled_dot_product_flash_attention_for_cpu`` for (B, heads, T, d) inputs, whose backward has no derivative
and which has no forward-mode rule; the curvature operators therefore run their forward passes on SDPA's math
backend (``curvature._modes.differentiable_attention``), so both variants work and compute the same function.

The curvature operators see :class:`NextTokenLM`: it returns the logits in PyTorch's N-D cross-entropy layout
``(B, vocab, T)``, so ``torch.nn.CrossEntropyLoss()`` takes the ``(B, T)`` next-token targets as they are and
averages over all ``B * T`` positions (the closed-form GGN and Fisher apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096
    context: int = 256  # the longest sequence (number of position embeddings)
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    mlp_ratio: int = 4
    dropout: float = 0.0
    tied: bool = True  # the output projection is the token embedding
    attention: str = "plain"  # "plain": softmax written out; "sdpa": F.scaled_dot_product_attention


def gpt_20m() -> GPTConfig:
    """6 layers, d_model 512, 8 heads, vocab 4096, context 256, tied embeddings: 21 143 552 parameters."""
    return GPTConfig()


def gpt_tiny(tied: bool = True) -> GPTConfig:
    """2 layers, d_model 4, 2 heads, vocab 7, context 5: 400 parameters tied, 428 untied (dense references)."""
    return GPTConfig(vocab_size=7, context=5, n_layer=2, n_head=2, d_model=4, mlp_ratio=2, tied=tied)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head}.")
        self.n_head = cfg.n_head
        self.sdpa = cfg.attention == "sdpa"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
            return self.drop(self.proj(y.reshape(B, T, C)))
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = (q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))).masked_fill(future, float("-inf"))
        att = self.drop(torch.softmax(scores, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(tokens (B, T) long) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.cfg.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.cfg.context}.")
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class NextTokenLM(nn.Module):
    """``GPT`` with its logits moved to the cross-entropy layout ``(B, vocab, T)`` (a view, no copy)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gpt = GPT(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens).transpose(1, 2)


def block_names(model: nn.Module, blocks: list[int], head: bool = True) -> list[str]:
    """The parameter names of the given transformer blocks (negative indices count from the end), with the
    final LayerNorm and an untied output head if ``head``: the ``params=`` of a restricted operator."""
    n_layer = len(next(m for m in model.modules() if isinstance(m, GPT)).blocks)
    wanted = [f"blocks.{b % n_layer}." for b in blocks] + (["ln_f.", "head."] if head else [])
    return [n for n, _ in model.named_parameters() if any(w in n for w in wanted)]


def token_batch(cfg: GPTConfig, batch: int, seq: int, generator: torch.Generator,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ``(batch, seq)`` and their next-token targets: the same sequences shifted by one."""
    if seq > cfg.context:
        raise ValueError(f"seq={seq} exceeds the context {cfg.context}.")
    stream = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=generator)
    return stream[:, :-1].to(device), stream[:, 1:].to(device)


def num_params(model: nn.Module) -> int:
    """Trainable scalars, each tied tensor counted once (as ``model.parameters()`` does)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
