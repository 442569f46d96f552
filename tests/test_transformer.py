"""The GPT of benchmarks/_transformer.py (issue 8) under the operators: dense float64 references, ``params=``
restriction to one block, tied embeddings, no side effects; and a smoke run of benchmarks/large_model.py."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_unchanged, rel_err, snapshot

import curvature
import curvature.reference as ref

ROOT = Path(__file__).resolve().parents[1]


def _load_transformer():
    """benchmarks/_transformer.py by path (benchmarks/ is not a package); registered so dataclasses resolve."""
    spec = importlib.util.spec_from_file_location("_transformer", ROOT / "benchmarks" / "_transformer.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


tf = _load_transformer()
OPERATORS = {
    "hessian": (curvature.HessianOperator, ref.hessian_matrix),
    "ggn": (curvature.GGNOperator, ref.ggn),
    "fisher": (curvature.FisherOperator, ref.fisher),
}
TIED = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


def make(tied: bool) -> tuple[torch.nn.Module, torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The tiny GPT in float64, weights drawn at scale 0.5 (not GPT-2's 0.02, at which the attention is
    nearly uniform and the logits nearly constant), and 3 sequences of 5 tokens with next-token targets."""
    cfg = tf.gpt_tiny(tied)
    torch.manual_seed(0)
    model = tf.NextTokenLM(cfg).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, torch.nn.CrossEntropyLoss(), tf.token_batch(cfg, 3, cfg.context, gen)


@functools.cache
def dense(kind: str, tied: bool, block: bool = False) -> torch.Tensor:
    model, loss_fn, data = make(tied)
    params = tf.block_names(model, [-1]) if block else None
    return OPERATORS[kind][1](model, loss_fn, data, params=params)


def probes(n: int) -> torch.Tensor:
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def test_parameter_counts() -> None:
    assert tf.num_params(tf.NextTokenLM(tf.gpt_tiny(True))) == 400
    assert tf.num_params(tf.NextTokenLM(tf.gpt_tiny(False))) == 428
    assert tf.num_params(tf.NextTokenLM(tf.gpt_20m())) == 21_143_552


@TIED
def test_tiny_case_is_not_degenerate(tied: bool) -> None:
    """The Hessian differs from the GGN (the residual term matters) and is indefinite."""
    H, G = dense("hessian", tied), dense("ggn", tied)
    assert rel_err(G, H) > 0.1
    eig = torch.linalg.eigvalsh(H)
    assert eig[0] < -1e-3 * eig[-1] and eig[-1] > 0


@TIED
@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_products_match_dense_reference(kind: str, tied: bool) -> None:
    expected = dense(kind, tied)
    model, loss_fn, data = make(tied)
    for p in model.parameters():  # a user's pending gradients must survive
        p.grad = torch.randn_like(p)
    before = snapshot(model)
    op = OPERATORS[kind][0](model, loss_fn, data)
    V = probes(op.shape[0])
    assert op.shape == expected.shape == (tf.num_params(model),) * 2
    assert rel_err(op @ V, expected @ V) <= 1e-10
    assert rel_err(op @ V[:, 0], expected @ V[:, 0]) <= 1e-10  # through the kept graph
    assert model.training
    assert_unchanged(model, before)


@TIED
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_params_restricted_to_the_last_block(kind: str, tied: bool) -> None:
    """``params=`` the last block and the final LayerNorm (and an untied head): the principal sub-block."""
    model, loss_fn, data = make(tied)
    names = tf.block_names(model, [-1])
    op = OPERATORS[kind][0](model, loss_fn, data, params=names)
    assert op.param_names == names
    block = dense(kind, tied, block=True)
    named = dict(model.named_parameters())
    assert op.shape == block.shape == (sum(named[n].numel() for n in names),) * 2
    V = probes(op.shape[0])
    assert rel_err(op @ V, block @ V) <= 1e-10
    # The same block cut out of the full reference, by the parameters' offsets in model.parameters() order.
    offsets, index = 0, []
    for name, p in model.named_parameters():
        if name in names:
            index.append(torch.arange(offsets, offsets + p.numel()))
        offsets += p.numel()
    index = torch.cat(index)
    assert rel_err(dense(kind, tied)[index][:, index], block) <= 1e-12


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("keep_graph", [True, False], ids=["kept", "fresh"])
def test_fused_attention_in_float32_equals_the_dense_reference(kind: str, keep_graph: bool) -> None:
    """F.scaled_dot_product_attention picks a fused CPU kernel for float32 whose backward cannot be differentiated;
    the operators run the forward on the math backend, so the products work and equal the plain-ops reference."""
    plain, loss_fn, (x, y) = make(True)
    cfg = tf.GPTConfig(**{**tf.gpt_tiny(True).__dict__, "attention": "sdpa"})
    fused = tf.NextTokenLM(cfg).float()
    fused.load_state_dict(plain.state_dict())
    op = OPERATORS[kind][0](fused, loss_fn, (x, y), keep_graph=keep_graph)
    V = probes(op.shape[0])
    assert rel_err(op @ V.float(), dense(kind, True) @ V) < 1e-5
    assert fused.gpt.blocks[0].attn.sdpa  # the model really calls SDPA


def test_tied_head_is_the_embedding() -> None:
    """With tied embeddings the head's name means the token embedding: one parameter, used twice."""
    model, loss_fn, data = make(tied=True)
    by_head = curvature.HessianOperator(model, loss_fn, data, params=["gpt.head.weight"])
    by_tok = curvature.HessianOperator(model, loss_fn, data, params=["gpt.tok.weight"])
    assert by_head.param_names == by_tok.param_names == ["gpt.tok.weight"]
    V = probes(by_tok.shape[0])
    assert rel_err(by_head @ V, by_tok @ V) <= 1e-14
    expected = ref.hessian_matrix(model, loss_fn, data, params=["gpt.tok.weight"]) @ V
    assert rel_err(by_tok @ V, expected) <= 1e-10


@pytest.mark.slow
def test_large_model_benchmark_quick() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "large_model.py"), "--quick", "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "P = 34688 parameters" in out
    for row in ("| gradient (forward + backward) | 34,688 |", "| H @ v, one-shot |", "| G @ v, kept graph |",
                "| H @ v, last block, kept graph | 12,768 |", "| lambda_max, last block"):
        assert row in out, out
