"""GPTQ rounding and calibration (``graphfix.quant.gptq``, ``quant.calibration``): lower output error than
round-to-nearest on correlated inputs, the same packed format, and ``quantize``'s choice of method.

The real SmolLM2's perplexity under GPTQ is in ``tests/test_quant_quality.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import graphfix
from graphfix.errors import InputError
from graphfix.quant import QuantLinear, parse_scheme
from graphfix.quant.gptq import _inverse_factor, quantize_gptq, quantize_mse
from graphfix.quant.scheme import dequantize_packed, quantize_weight
from tests.test_runtime import PROMPTS, tiny_hf


def _problem(n: int = 48, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight and inputs whose features are correlated and of unequal size, as a model's activations are."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, k, generator=gen) @ torch.randn(k, k, generator=gen) * torch.linspace(0.2, 3, k)
    return torch.randn(n, k, generator=gen) * k ** -0.5, x, x.T @ x


def _output_error(p, w: torch.Tensor, x: torch.Tensor) -> float:
    return (x @ (dequantize_packed(p, torch.float32) - w).T).pow(2).sum().item()


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse():
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 64)
    h = x.T @ x
    u = _inverse_factor(h[None], 0.0)[0]
    assert torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h.double()).float(), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name", ["int8", "int8:32", "int4:32"])
def test_gptq_has_lower_output_error_than_round_to_nearest_in_the_same_format(name):
    scheme = parse_scheme(name)
    w, x, h = _problem()
    rtn, gptq = quantize_weight(w, scheme), quantize_gptq(w, h, scheme)
    assert _output_error(gptq, w, x) < 0.75 * _output_error(rtn, w, x)
    for field in ("codes", "scales", "zeros"):
        a, b = getattr(rtn, field), getattr(gptq, field)
        assert (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype))
    if scheme.bits == 8:
        assert gptq.codes.abs().max() <= 127


def test_batched_gptq_equals_one_linear_at_a_time_and_mse_scales_never_lose_to_absmax():
    scheme = parse_scheme("int8")
    w, _, h = _problem()
    w2, _, h2 = _problem(seed=1)
    both = quantize_gptq(torch.stack([w, w2]), torch.stack([h, h2]), scheme)
    for p, (wi, hi) in zip(both, ((w, h), (w2, h2))):
        one = quantize_gptq(wi, hi, scheme)
        assert torch.equal(p.codes, one.codes) and torch.equal(p.scales, one.scales)
    mse, rtn = (dequantize_packed(p, torch.float32) - w for p in (quantize_mse(w, scheme), quantize_weight(w, scheme)))
    assert (mse.pow(2).sum(-1) <= rtn.pow(2).sum(-1) + 1e-12).all()


def test_quantize_calibrates_through_the_model_records_the_method_and_falls_back_without_data():
    ids = torch.tensor([PROMPTS[1] * 4])
    model = tiny_hf("llama")
    lines: list[str] = []
    report = graphfix.quantize(model, "int8", calibration=torch.randint(0, 100, (2, 40)), progress=lines.append)
    assert report.method == "gptq" and "80 calibration tokens" in report.summary()
    assert lines and all(line.startswith("GPTQ pass ") and "80 calibration tokens" in line for line in lines)
    assert {m.method for m in model.modules() if isinstance(m, QuantLinear)} == {"gptq"}
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    calib = torch.randint(0, 100, (1, 40))
    int4 = graphfix.quantize(tiny_hf("llama"), "int4:32", calibration=calib)  # auto: GPTQ for int8 only
    assert int4.method == "rtn" and "int8 only" in int4.calibration
    assert graphfix.quantize(tiny_hf("llama"), "int4:32", calibration=calib, method="gptq").method == "gptq"
    fallback = graphfix.quantize(tiny_hf("llama"), "int8")  # no tokenizer to be found: no calibration
    assert fallback.method == "rtn" and "no calibration" in fallback.calibration
    with pytest.raises(InputError, match="GPTQ needs calibration"):
        graphfix.quantize(tiny_hf("llama"), "int8", method="gptq")
    with pytest.raises(InputError, match="unknown quantization method"):
        graphfix.quantize(tiny_hf("llama"), "int8", method="awq")


def test_dequantizing_kernel_reads_gptq_codes_like_the_reference():
    """GPTQ writes the same format: the int8 and int4 kernels, in Triton's interpreter, agree with dequantize."""
    code = """
import torch, graphfix.quant.kernels
from graphfix.engine.kernels import fused_linear_reference
from graphfix.quant.gptq import quantize_gptq
from graphfix.quant.scheme import dequantize_packed, parse_scheme
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)
w = torch.randn(16, 128, generator=g) * 0.1
for name in ("int8", "int4:32"):
    s = parse_scheme(name)
    p = quantize_gptq(w, x.T @ x, s)
    v = torch.randn(1, 1, 128, generator=g)
    out = torch.ops.graphfix.qgemv(v, p.codes, p.scales, p.zeros, None, 0.0, False, None, None, s.bits, s.group_size or 0)
    ref = fused_linear_reference(v, dequantize_packed(p, torch.float32)).view(1, 16)
    print(name, ((out - ref).abs().max() / ref.abs().max()).item())
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = dict(line.split() for line in proc.stdout.splitlines())
    assert set(errors) == {"int8", "int4:32"} and all(float(e) < 1e-5 for e in errors.values()), errors
