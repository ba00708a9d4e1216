"""The model zoo: every entry's own loop runs, uses its cache correctly, and torch's own logs about it are plausible."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests import zoo
from tests.zoo import research_style
from tests.zoo.torch_logs import LOG_STEPS, TorchLog, parse, torch_logged_once

NAMES = list(zoo.ZOO)


def _prompt_row(name: str) -> torch.Tensor:
    return zoo.module(name).PROMPT.view(1, -1)


@pytest.mark.parametrize("name", NAMES)
def test_loop_is_greedy_over_the_cache_and_repeatable(name):
    module = zoo.module(name)
    model = zoo.builder(name)(0)
    first = module.loop(model)
    second = module.loop(model)
    assert first.shape == (1, 33) and first.dtype == torch.int64
    assert torch.equal(first, second), "a second loop must set up its cache afresh"
    assert len(set(first[0].tolist())) > 3, "the tiny model must not be degenerate, or a cache bug would go unseen"

    prompt = _prompt_row(name)
    whole = torch.cat([prompt, first[:, :-1]], dim=1)
    logits = module.logits_without_cache(model, whole)
    greedy = logits[0, prompt.shape[1] - 1:].argmax(dim=-1)
    assert torch.equal(greedy, first[0]), "tokens decoded through the cache differ from one pass over the sequence"


@pytest.mark.parametrize("name", NAMES)
def test_entry_builds_deterministically_from_the_seed(name):
    model, loop = zoo.load(name)
    assert callable(loop) and not model.training
    again = zoo.builder(name)(0).state_dict()
    other = zoo.builder(name)(1).state_dict()
    params = dict(model.named_parameters())
    assert params and all(torch.equal(p, again[k]) for k, p in params.items())
    assert any(not torch.equal(p, other[k]) for k, p in params.items())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert zoo.entry_spec(name).startswith(zoo.ZOO[name] + ":")


CONSTRUCT_TEXT = {
    "complex-rope": ["torch.polar", "view_as_complex", "view_as_real", "register_buffer"],
    "manual-attention": ["einsum", "masked_fill", "softmax", "repeat_kv"],
    "sdp-kernel": ["torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)"],
    "growing-cache": ["self.cache_k = None", "torch.cat([self.cache_k, k], dim=2)", "torch.cat([self.cache_v, v]"],
    "int-attribute": ["self.pos = 0", "if self.pos == 0", "self.freqs_cis[self.pos", "self.pos += "],
    "logging": ["print(", "logging.info(", "warnings.warn("],
    "inference-mode": ["@torch.inference_mode()"],
    "async-collective": ["dist.all_reduce(out, async_op=True)", "work.wait()"],
    "autograd-collective": ["dist.all_reduce(x)", "ctx.mark_dirty(x)", "ReduceFromParallelRegion.apply("],
    "item-check": [".item() >= self.vocab_size"],
}


def test_research_model_marks_every_construct_where_it_is():
    lines = research_style.__loader__.get_source(research_style.__name__).splitlines()
    found = research_style.construct_lines()
    assert set(found) == set(CONSTRUCT_TEXT)
    for construct, snippets in CONSTRUCT_TEXT.items():
        text = "\n".join(lines[n - 1] for n in found[construct])
        missing = [s for s in snippets if s not in text]
        assert not missing, f"{construct}: {missing} not on its marked lines {found[construct]}"


def test_zoo_readme_lists_the_research_constructs_at_their_lines():
    readme = (Path(zoo.__file__).parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| ([\d, ]+) \|", readme, flags=re.MULTILINE))
    assert {name: [int(n) for n in lines.split(",")] for name, lines in rows.items()} == research_style.construct_lines()


def test_parse_groups_multiline_records_and_strips_guard_comments():
    prefix = "[rank0]:V1203 10:07:42.169000 13265 torch/_dynamo/{}] [{}] [__{}] "
    stderr = "\n".join([
        prefix.format("symbolic_convert.py:5124", "0/0", "graph_breaks") + "Graph break in user code at /m.py:12",
        prefix.format("symbolic_convert.py:5124", "0/0", "graph_breaks")
        + "Graph Break Reason: Encountered graph break when attempting to trace CALL: a function call",
        prefix.format("symbolic_convert.py:5124", "0/0", "graph_breaks") + "",
        prefix.format("symbolic_convert.py:5124", "0/0", "graph_breaks") + "Unsupported Tensor.item() call",
        "W1203 10:07:43.000000 13265 torch/_dynamo/other.py:1] unrelated warning",
        prefix.format("guards.py:5396", "0/1", "recompiles") + "Recompiling function forward in /m.py:10",
        prefix.format("guards.py:5396", "0/1", "recompiles") + "    triggered by the following guard failure(s):",
        prefix.format("guards.py:5396", "0/1", "recompiles")
        + "    - 0/0: self.pos == 0                                 # if self.pos == 0:  # m.py:14 in forward",
    ])
    log = parse(stderr)
    assert log.breaks == [("/m.py", 12, "Unsupported Tensor.item() call")]
    assert log.recompiles == [("forward", "self.pos == 0")]
    assert log.recompile_records[0].line == 10 and log.break_sites == [("/m.py", 12)]


@pytest.fixture(scope="module")
def torch_logs() -> dict[str, TorchLog]:
    """Every entry's loop, forward compiled with the eager backend, in subprocesses run side by side.

    The runs are kept for the process (``torch_logged_once``): test_zoo_optimize compares its reports with them."""
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        runs = {name: pool.submit(torch_logged_once, name, "eager", LOG_STEPS) for name in NAMES}
        return {name: run.result() for name, run in runs.items()}


def _break_lines_in(log: TorchLog, path_end: str) -> set[int]:
    return {line for file, line, _ in log.breaks if file.endswith(path_end)}


def _guards(log: TorchLog) -> str:
    return "\n".join(guard for _, guard in log.recompiles)


def _check_research(log: TorchLog) -> None:
    found = research_style.construct_lines()
    broken = _break_lines_in(log, "tests/zoo/research_style.py")
    for construct in ("item-check", "logging", "sdp-kernel", "async-collective", "autograd-collective"):
        assert broken & set(found[construct]), f"no graph break logged at the {construct} lines {found[construct]}"
    reasons = " ".join(reason for _, _, reason in log.breaks)
    assert "item()" in reasons and "mark_dirty" in reasons and "async_op" in reasons
    assert "self.cache_k" in _guards(log), "the growing cache must show up as a recompile"


def _check_meta(log: TorchLog) -> None:
    assert any("fairscale" in file and "mark_dirty" in reason for file, _, reason in log.breaks)
    assert log.recompiles, "the int start_pos and prefill-to-decode shapes recompile"


def _check_hf(log: TorchLog) -> None:
    assert not log.breaks
    assert re.search(r"past_key_values.*(keys|values)", _guards(log)), "DynamicCache growth must recompile"


def _check_fms(log: TorchLog) -> None:
    assert not log.breaks
    assert "past_key_value_states" in _guards(log), "the torch.cat cache must recompile"


def _check_clean_static(log: TorchLog) -> None:
    assert not log.breaks
    assert 1 <= len(log.recompiles) <= 2, "prefill to decode recompiles, then a static cache must not"


PLAUSIBLE = {"research": _check_research, "meta": _check_meta, "hf-llama": _check_hf, "hf-qwen2": _check_hf,
             "fms": _check_fms, "litgpt": _check_clean_static, "gpt-fast": _check_clean_static}


@pytest.mark.parametrize("name", NAMES)
def test_torch_logs_are_plausible_and_compiled_tokens_match_eager(name, torch_logs):
    log = torch_logs[name]
    assert "[__graph_breaks]" in log.raw or "[__recompiles]" in log.raw, "TORCH_LOGS produced no record at all"
    PLAUSIBLE[name](log)
    eager = zoo.module(name).loop(zoo.builder(name)(0), LOG_STEPS)
    assert log.tokens == eager[0].tolist()
