"""Drivers: the user's loop, conventions read from signatures, honest counting, recompile attribution."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphfix
from graphfix.diagnose.drivers import (
    FMSDriver,
    HFDriver,
    InputPosDriver,
    LoopDriver,
    MetaDriver,
    auto_driver,
    convention,
)
from graphfix.diagnose.findings import Category
from graphfix.diagnose.sources import load_callable
from graphfix.errors import InputError, ModelRunError
from tests.fixtures.tiny_hf import tiny_hf
from tests.zoo import load


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(64, 16), nn.Linear(16, 64)


class StartPos(_Tiny):
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.out(self.emb(tokens))


class TensorPosNoCache(_Tiny):
    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.emb(idx))


class TokensOnly(_Tiny):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens))


class Counter(_Tiny):
    """Positions in an int attribute used in control flow: one graph per value without help."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if self.pos > 0:
            h = h * 2
        self.pos += tokens.shape[1]
        return self.out(h)


class Positions(_Tiny):
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens) + positions[None, :, None].float())


class Uncompiled(_Tiny):
    @torch._dynamo.disable
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens))


def _counter_loop(model: nn.Module) -> torch.Tensor:
    model.pos = 0
    ids, out = torch.tensor([[1, 2, 3, 4]]), []
    for _ in range(6):
        ids = model(ids)[:, -1:].argmax(-1)
        out.append(ids)
    return torch.cat(out, 1)


def _positions_loop(model: nn.Module) -> torch.Tensor:
    """int64 positions for the prompt and the first step (``pos[-1:] + 1``), int32 ones after that."""
    ids, pos, out = torch.tensor([[1, 2, 3, 4]]), torch.arange(4), []
    for step in range(6):
        ids = model(ids, pos)[:, -1:].argmax(-1)
        pos = pos[-1:] + 1 if step == 0 else torch.tensor([int(pos[-1]) + 1], dtype=torch.int32)
        out.append(ids)
    return torch.cat(out, 1)


def test_conventions_are_read_from_signatures():
    assert convention(StartPos()) == "meta-start-pos" and isinstance(auto_driver(StartPos()), MetaDriver)
    assert isinstance(auto_driver(tiny_hf("llama")), HFDriver)
    assert isinstance(auto_driver(load("gpt-fast")[0]), InputPosDriver)  # setup_caches
    assert isinstance(auto_driver(load("litgpt")[0]), InputPosDriver)  # set_kv_cache, not Meta's int start_pos
    assert isinstance(auto_driver(load("fms")[0]), FMSDriver)


def test_unrecognised_conventions_are_one_line_naming_the_driver():
    for model, said in ((TokensOnly(), "TokensOnly.forward(tokens"), (TensorPosNoCache(), "no cache set-up method")):
        with pytest.raises(InputError) as info:
            graphfix.diagnose(model)
        assert said in str(info.value) and "--driver" in str(info.value) and "\n" not in str(info.value)


def test_recognised_conventions_drive_their_own_cache():
    for name in ("gpt-fast", "litgpt", "fms"):
        model, _ = load(name)
        report = graphfix.diagnose(model, decode_steps=4, hidden=False)
        assert report.stats.forward_calls == 5 and report.stats.graph_runs >= 5, name


def test_a_loop_that_calls_generate_is_counted_compiled():
    model = tiny_hf("llama")

    def loop(m: nn.Module) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = m.generate(torch.tensor([[3, 5, 7]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        return out[:, 3:]

    report = graphfix.diagnose(model, driver=loop, hidden=False)
    assert report.stats.forward_calls == 6 and report.stats.graph_runs >= 6
    assert not any(f.category == Category.NOT_COMPILED for f in report.findings)


def test_a_loop_that_runs_no_compiled_graph_is_never_clean():
    report = graphfix.diagnose(Uncompiled(), driver=_counter_loop_plain, hidden=False)
    assert report.stats.graph_runs == 0 and not report.clean
    (finding,) = [f for f in report.findings if f.category == Category.NOT_COMPILED]
    assert "no compiled graph ran in 6 forward call(s)" in finding.message


def _counter_loop_plain(model: nn.Module) -> torch.Tensor:
    ids, out = torch.tensor([[1, 2, 3]]), []
    for _ in range(6):
        ids = model(ids)[:, -1:].argmax(-1)
        out.append(ids)
    return torch.cat(out, 1)


def test_a_loop_that_never_calls_the_model_is_an_input_error():
    other = TokensOnly()
    with pytest.raises(InputError, match="never called"):
        graphfix.diagnose(TokensOnly(), driver=lambda m: _counter_loop_plain(other), hidden=False)


def test_a_broken_model_is_blamed_only_when_the_driver_is_the_users():
    def bad(m: nn.Module) -> None:
        m(torch.ones(2, 3))  # float ids: the embedding fails

    with pytest.raises(ModelRunError, match="fails in eager mode"):
        graphfix.diagnose(TokensOnly(), driver=bad, hidden=False)


@pytest.mark.parametrize(("build", "loop", "category", "guard"), [
    (Counter, _counter_loop, Category.INT_ATTRIBUTE, "self.pos"),
    (Positions, _positions_loop, Category.DTYPE_RECOMPILE, "dtype mismatch"),
], ids=["int-attribute", "dtype"])
def test_recompiles_between_calls_have_their_own_category_fixed_by_phase_split(build, loop, category, guard):
    report = graphfix.diagnose(build(), driver=loop, hidden=False)
    found = [f for f in report.recompiles if f.category == category]
    assert found and found[0].fix_pass == "phase-split" and guard in found[0].guard
    result = graphfix.optimize(build(), driver=loop, backend="aot_eager")
    assert result.verified and result.verification.recompiles == 0, result.summary()


class Reused(_Tiny):
    """``scale`` breaks (its print), so Dynamo compiles it as a frame of its own, called at two widths per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = scale(self.emb(tokens))
        return self.out(scale(self.up(h))[..., :16])


def scale(x: torch.Tensor) -> torch.Tensor:
    print("scale")
    return x * x.shape[-1] ** -0.5


def test_a_function_reused_at_other_shapes_is_its_own_category():
    report = graphfix.diagnose(Reused(), driver=_counter_loop_plain, hidden=False)
    found = [f for f in report.recompiles if f.category == Category.SHAPE_REUSE]
    assert found and found[0].phase == "prefill" and found[0].fix_pass is None


def test_builder_forms(tmp_path, monkeypatch):
    module = tmp_path / "zoo_builders.py"
    module.write_text(
        "import torch\n"
        "from tests.test_drivers import StartPos\n"
        "def prompt(): return StartPos(), torch.tensor([[1, 2, 3]])\n"
        "def loop(): return StartPos(), (lambda m: m(torch.tensor([[1]]), 0))\n"
        "def calls(): return StartPos(), [(torch.tensor([[1]]), 0)]\n"
        "def bad(): return StartPos(), 5\n"
        "def exits(): raise SystemExit(7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_callable("zoo_builders:prompt").inputs, torch.Tensor)
    assert callable(load_callable("zoo_builders:loop").driver)
    assert isinstance(load_callable("zoo_builders:calls").inputs, list)
    with pytest.raises(InputError, match=r"returned \(model, int\)"):
        load_callable("zoo_builders:bad")
    with pytest.raises(ModelRunError, match="SystemExit"):
        load_callable("zoo_builders:exits")
    report = graphfix.diagnose(*_prompt_pair(), hidden=False)
    assert report.prefill_tokens == 3


def _prompt_pair() -> tuple[nn.Module, torch.Tensor]:
    return StartPos(), torch.tensor([[1, 2, 3]])


def test_optimize_without_a_driver_for_an_unknown_convention_touches_nothing():
    model = TokensOnly()
    before = dict(model.__dict__)
    with pytest.raises(InputError, match="--driver"):
        graphfix.optimize(model, passes="side-effects,sdpa-context,functional-collectives,inference-mode")
    assert model.__dict__.keys() == before.keys() and "graphfix_optimized" not in model.__dict__
    result = graphfix.optimize(model, driver=_counter_loop_plain, backend="aot_eager")  # and can still be optimized
    assert result.verified, result.summary()


def test_loop_driver_stops_a_long_loop_at_the_asked_steps():
    driver = LoopDriver(_counter_loop_plain)
    assert driver.run(TokensOnly(), steps=2) is None  # stopped inside the loop: its tokens are not returned
    tokens = driver.run(TokensOnly())
    assert tokens.shape == (1, 6) and driver.decode_steps == 5 and driver.prefill_tokens == 3
