"""Pass real-rope on code that is not Meta's: complex RoPE becomes real pairs wherever the construct is.

The models (tests/fixtures/rope_styles.py) write complex RoPE the ways codebases do: Meta's global
helpers under another attention, a persistent complex buffer in a rotary module, ``torch.polar`` in
forward, the halves layout with ``torch.complex``. Each is checked over a prefill and decode steps
against the untouched model, eager and compiled with ``fullgraph=True``.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from pathlib import Path

import pytest
import torch

from graphfix.diagnose.inductor_scan import scan_fallbacks
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import PassContext
from passes.rope import RealRopePass
from tests.fixtures import rope_styles

CTX = PassContext()
STEPS = 4


def _decode(model, tokens: torch.Tensor, steps: int = STEPS) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefill then greedy decode steps at tensor positions: the logits of each call and the tokens chosen."""
    with torch.no_grad():
        logits = [model(tokens, torch.arange(tokens.shape[1]))]
        chosen = [logits[-1][:, -1].argmax(-1, keepdim=True)]
        for step in range(steps):
            logits.append(model(chosen[-1], torch.tensor([tokens.shape[1] + step])))
            chosen.append(logits[-1][:, -1].argmax(-1, keepdim=True))
    return logits, torch.cat(chosen, dim=1)


def _assert_same_decode(reference, model, tokens: torch.Tensor) -> None:
    ref_logits, ref_tokens = _decode(reference, tokens)
    logits, out_tokens = _decode(model, tokens)
    scale = max(t.abs().max().item() for t in ref_logits)
    assert max((a - b).abs().max().item() for a, b in zip(ref_logits, logits)) <= 1e-5 * scale
    assert torch.equal(ref_tokens, out_tokens)


def _complex_tensors(model: torch.nn.Module) -> list[str]:
    """Complex tensors a model holds: buffers, parameters, plain tensor attributes."""
    found = [n for n, t in [*model.named_buffers(), *model.named_parameters()] if t.is_complex()]
    for path, module in model.named_modules():
        found += [f"{path}.{k}" for k, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_complex()]
    return found


def _rewritten_sources(model: torch.nn.Module) -> list[str]:
    return [s for m in model.modules() for name, _ in sr.user_methods(m) if (s := sr.rewritten_source(m, name))]


def _tokens() -> torch.Tensor:
    return torch.randint(0, rope_styles.VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))


def _rewritten(style: str, seed: int = 0):
    model = rope_styles.build(style, seed)
    return model, RealRopePass().apply(model, CTX)


@pytest.mark.parametrize("style", list(rope_styles.STYLES))
def test_rewrite_keeps_outputs_and_compiles_fullgraph(style):
    reference = rope_styles.build(style)
    assert _complex_tensors(reference) or style in ("polar_style", "lazy_style")
    model, result = _rewritten(style)
    assert result.rewritten > 0 and not result.skipped, result
    assert not _complex_tensors(model)
    sources = _rewritten_sources(model)
    assert sources and all("torch.view_as_complex(" not in s and "torch.polar(" not in s for s in sources)

    _assert_same_decode(reference, model, _tokens())
    assert not _complex_tensors(model)  # also after a table built in forward was stored
    torch._dynamo.reset()
    _assert_same_decode(reference, torch.compile(model, fullgraph=True, backend="aot_eager"), _tokens())

    again = RealRopePass().apply(model, CTX)
    assert again.rewritten == 0 and not again.skipped and again.notes


def test_inductor_generates_real_code_without_complex_fallbacks():
    def complex_fallbacks(fn, *args) -> list[str]:
        torch._dynamo.reset()
        with scan_fallbacks() as scanner, warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.compile(fn, fullgraph=True, backend="inductor")(*args)
        said = [str(w.message) for w in caught if "complex operators" in str(w.message)]
        return [f.op for f in scanner.found if "complex" in f.reason] + said

    q = torch.randn(1, 6, rope_styles.HEADS, rope_styles.HEAD_DIM)
    table = rope_styles.precompute_freqs_cis(rope_styles.HEAD_DIM, 6)
    assert complex_fallbacks(rope_styles.apply_rotary_emb, q, q, table)  # the check sees them when they are there
    reference = rope_styles.build("meta_style")
    model, _ = _rewritten("meta_style")
    tokens = _tokens()
    assert complex_fallbacks(model, tokens, torch.arange(tokens.shape[1])) == []
    _assert_same_decode(reference, model, tokens)


def test_buffer_follows_the_device_and_stays_float32_under_dtype_casts():
    model, _ = _rewritten("buffer_style")
    rotary = model.layers[0].attention.rotary
    assert rotary.freqs_cis.dtype == torch.float32 and rotary.freqs_cis.shape == (rope_styles.MAX_LEN, 4, 2)

    reference64 = rope_styles.build("buffer_style").double()  # double() leaves a complex buffer complex64
    assert reference64.layers[0].attention.rotary.freqs_cis.dtype == torch.complex64
    _assert_same_decode(reference64, model.to(torch.float64), _tokens())
    assert rotary.freqs_cis.dtype == torch.float32 and model.output.weight.dtype == torch.float64

    dropped = rope_styles.build("buffer_style")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dropped.to(torch.float64)  # torch casts a complex buffer to a real dtype by dropping the imaginary part
    assert not dropped.layers[0].attention.rotary.freqs_cis.is_complex()

    model.to(torch.bfloat16)
    assert rotary.freqs_cis.dtype == torch.float32 and model.output.weight.dtype == torch.bfloat16
    model.to("meta")
    assert rotary.freqs_cis.device.type == "meta" and rotary.freqs_cis.dtype == torch.float32


def test_state_dict_keeps_keys_and_complex_values_both_ways():
    original = rope_styles.build("buffer_style", seed=1)
    model, _ = _rewritten("buffer_style", seed=0)
    saved = model.state_dict()
    assert saved.keys() == original.state_dict().keys()
    key = "layers.1.attention.rotary.freqs_cis"
    assert saved[key].dtype == torch.complex64 and torch.equal(saved[key], original.state_dict()[key])

    model.load_state_dict(original.state_dict(), strict=True)  # an original checkpoint loads into the rewrite
    assert model.layers[1].attention.rotary.freqs_cis.dtype == torch.float32
    _assert_same_decode(original, model, _tokens())

    fresh = rope_styles.build("buffer_style", seed=2)
    fresh.load_state_dict(model.state_dict(), strict=True)  # and a checkpoint saved after it loads into the original
    _assert_same_decode(original, fresh, _tokens())

    paired = {**original.state_dict(), key: torch.view_as_real(original.state_dict()[key]) * 0}
    model.load_state_dict(paired, strict=True)  # a state dict holding the pair itself loads too
    assert torch.equal(model.layers[1].attention.rotary.freqs_cis, torch.zeros(rope_styles.MAX_LEN, 4, 2))


def test_deepcopy_keeps_the_rewrite_and_pickling_the_whole_model_refuses():
    reference = rope_styles.build("buffer_style")
    model, _ = _rewritten("buffer_style")
    copied = copy.deepcopy(model)
    _assert_same_decode(reference, copied, _tokens())
    copied.half()
    assert copied.layers[0].attention.rotary.freqs_cis.dtype == torch.float32  # the copy's own _apply
    assert model.output.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="state_dict"):  # pickle would rebuild the original methods
        torch.save(model, io.BytesIO())


@pytest.mark.parametrize(("make", "line_of", "why"), [
    (lambda: rope_styles.Decoder(rope_styles.AbsAttention), "q_ / q_.abs()", "`.abs()` of a complex value"),
    (rope_styles.ArgumentDecoder, "xq_ * freqs_cis", "argument `freqs_cis` of ArgumentDecoder.forward"),
    (lambda: rope_styles.Decoder(rope_styles.PropertyAttention), "xq_ * freqs_cis", "a property"),
], ids=["abs", "argument", "property"])
def test_unsupported_model_is_reported_and_left_unchanged(make, line_of, why):
    model = make()
    before = _complex_tensors(model)
    result = RealRopePass().apply(model, CTX)
    assert result.rewritten == 0
    source = Path(rope_styles.__file__).read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if line_of in text)
    assert any(where.startswith(f"tests/fixtures/rope_styles.py:{line} ") and why in reason
               for where, reason in result.skipped), result.skipped
    assert _complex_tensors(model) == before
    assert _rewritten_sources(model) == []


def _pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))


class _Table(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freqs_cis", rope_styles.precompute_freqs_cis(8, 16))


class MatmulOfComplex(_Table):
    def forward(self, x):
        z = _pairs(x) * self.freqs_cis[: x.shape[0]]
        return torch.view_as_real(z @ z.transpose(0, 1)).flatten(-2)


class CatOfComplex(_Table):
    def forward(self, x):
        z = _pairs(x) * self.freqs_cis[: x.shape[0]]
        return torch.view_as_real(torch.cat([z, z], dim=-1)).flatten(-2)


class Spectral(torch.nn.Module):
    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x) * 2.0)


class ComplexConstant(torch.nn.Module):
    def forward(self, x, theta):
        return torch.view_as_real(_pairs(x) * torch.exp(1j * theta)).flatten(-2)


class ComplexDtype(torch.nn.Module):
    def forward(self, x):
        return torch.view_as_real(x.to(torch.complex64) * _pairs(x[..., :2].repeat(1, x.shape[-1]))).flatten(-2)


class InPlace(_Table):
    def forward(self, x):
        z = _pairs(x)
        z *= self.freqs_cis[: x.shape[0]]
        return torch.view_as_real(z).flatten(-2)


class Angle(_Table):
    def forward(self, x):
        return torch.angle(_pairs(x) * self.freqs_cis[: x.shape[0]])


class LearnedComplex(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rotation = torch.nn.Parameter(torch.polar(torch.ones(4), torch.zeros(4)))

    def forward(self, x):
        return torch.view_as_real(_pairs(x) * self.rotation).flatten(-2)


class StaticRotation(_Table):
    @staticmethod
    def rotate(x, freqs):
        return torch.view_as_real(_pairs(x) * freqs).flatten(-2)

    def forward(self, x):
        return self.rotate(x, self.freqs_cis[: x.shape[0]])


def _logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class OtherDecorator(_Table):
    @_logged
    def forward(self, x):
        return torch.view_as_real(_pairs(x) * self.freqs_cis[: x.shape[0]]).flatten(-2)


class NoGradRotation(_Table):
    @torch.no_grad()
    def forward(self, x):
        return torch.view_as_real(_pairs(x) * self.freqs_cis[: x.shape[0]]).flatten(-2)


def test_grad_mode_decorators_are_seen_through():
    model, x = NoGradRotation(), torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    expected = model(x)
    result = RealRopePass().apply(model, CTX)
    assert result.rewritten == 5 and not result.skipped, result  # the table, 3 sites in forward, 1 in _pairs
    out = model(x)
    assert (out - expected).abs().max() <= 1e-6 and not out.requires_grad and not _complex_tensors(model)


@pytest.mark.parametrize(("module", "why"), [
    (OtherDecorator, "cannot be recompiled"),
    (MatmulOfComplex, "`@` on a complex value"),
    (CatOfComplex, "is put in a list"),
    (Spectral, "torch.fft"),
    (ComplexConstant, "Python complex constant"),
    (ComplexDtype, "complex dtype"),
    (InPlace, "in-place arithmetic"),
    (Angle, "passes a complex value to torch.angle"),
    (LearnedComplex, "complex parameter"),
    (StaticRotation, "static or class method"),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_unsupported_construct_is_reported_and_left_unchanged(module, why):
    model = module()
    result = RealRopePass().apply(model, CTX)
    assert result.rewritten == 0 and any(why in reason for _, reason in result.skipped), result.skipped
    assert all(where.startswith("tests/test_pass_rope_generic.py:") for where, _ in result.skipped)
    assert _rewritten_sources(model) == [] and _complex_tensors(model) == _complex_tensors(module())
