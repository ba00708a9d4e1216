"""Diagnosing a representative subset of repeated decoder layers (``graphfix.diagnose.layer_subset``).

The subset must find what only some layers do (a break in layer 5 of 8), name the layer's real
module path, refuse to cut when code branches on a layer's position, and put the model back
exactly (the same list and module objects, the same config), also when the diagnosis raises.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphfix.diagnose import layer_subset
from graphfix.diagnose.diagnosis import diagnose
from graphfix.diagnose.findings import Category
from graphfix.errors import InputError, ModelRunError
from tests.fixtures.tiny_hf import tiny_hf


class Block(nn.Module):
    def __init__(self, dim: int, layer_id: int, clamp: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.clamp = clamp  # per-layer configuration: only the layers that have it break
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if self.clamp and x.abs().max().item() > 1e4:  # a data-dependent break, in this layer only
            x = x * 0.5
        return x + self.proj(x)


class PositionalBlock(Block):
    """The same break, decided by the layer's position rather than by an attribute of its own."""

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if self.layer_id == 5 and x.abs().max().item() > 1e4:
            x = x * 0.5
        return x + self.proj(x)


class Stack(nn.Module):
    """``forward(tokens, start_pos)``: 8 layers of one class, layer 5 configured differently."""

    def __init__(self, n_layers: int = 8, dim: int = 16, vocab: int = 32, block: type = Block,
                 fifth: type | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.n_layers = n_layers
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList((fifth if i == 5 and fifth else block)(dim, i, clamp=i == 5 and block is Block)
                                    for i in range(n_layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, start_pos)
        return self.head(h).float()


class ScaledBlock(Block):
    """Breaks in every layer and reads its position: Dynamo compiles the rest of each layer's frame per position."""

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if x.abs().max().item() > 1e4:
            x = x * 0.5
        return x + self.proj(x) * (self.layer_id + 1)


def _data_dependent(report):
    return [f for f in report.graph_breaks if f.category == Category.DATA_DEPENDENT]


def test_plan_keeps_one_layer_of_each_kind() -> None:
    model = Stack()
    path, stack, kept, _ = layer_subset.plan(model)
    assert (path, stack, kept) == ("layers", model.layers, [0, 5])  # layer_id counts positions: not a difference
    model.layers[3].proj = nn.Linear(16, 16, bias=False)  # another shape of parameters: another kind
    assert layer_subset.plan(model)[2] == [0, 3, 5]
    assert layer_subset.plan(Stack(n_layers=2)) is None  # too short to cut
    small = Stack(n_layers=3)  # a longer Sequential at the same depth, but not a stack of layers
    small.head = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 32))
    assert layer_subset.find_layer_stack(small) == ("layers", small.layers)


def test_plan_of_identical_hf_layers_keeps_first_and_last_and_respects_layer_types() -> None:
    model = tiny_hf("llama", num_hidden_layers=5)
    assert layer_subset.plan(model)[2] == [0, 4]
    config = model.config
    config.layer_types = ["full_attention", "full_attention", "sliding_attention", "full_attention", "full_attention"]
    assert layer_subset.plan(model)[2] == [0, 2]  # the per-layer config entry makes layer 2 a kind of its own


def test_break_in_one_layer_of_eight_is_found() -> None:
    report = diagnose(Stack(), decode_steps=2, hidden=False, layers="representative")
    (hit,) = _data_dependent(report)
    assert hit.module_paths == ["layers.*"]  # as for the whole model: findings name module classes' instances
    assert hit.location.line == Block.forward.__code__.co_firstlineno + 1
    assert any(n.startswith("diagnosed 2 of 8 layers (the others repeat them): layers 0, 5,") for n in report.notes)


class ClampBlock(Block):
    """Layer 5's own class: its module path must be the layer's own index, not its place in the subset."""

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if x.abs().max().item() > 1e4:
            x = x * 0.5
        return x + self.proj(x)


def test_break_in_a_layer_of_its_own_class_names_its_real_path() -> None:
    model = Stack(fifth=ClampBlock)
    assert layer_subset.plan(model)[2] == [0, 5]
    report = diagnose(model, decode_steps=2, hidden=False, layers="representative")
    (hit,) = _data_dependent(report)
    assert hit.module_paths == ["layers.5"]  # "layers.1" in the subset


def test_branch_on_layer_position_diagnoses_every_layer() -> None:
    model = Stack(block=PositionalBlock)
    assert layer_subset.plan(model) is None  # the position decides: no signature can stand for it
    report = diagnose(model, decode_steps=2, hidden=False, layers="representative")
    assert _data_dependent(report)
    assert not any(n.startswith("diagnosed ") for n in report.notes)


def test_recompiles_on_the_layer_position_make_the_diagnosis_run_every_layer() -> None:
    model = Stack(block=ScaledBlock)
    assert layer_subset.plan(model)[2] == [0, 7]  # the attribute only counts positions: the layers look alike
    report = diagnose(model, decode_steps=1, hidden=False, layers="representative")
    assert any(n.startswith("every layer diagnosed: a subset recompiled on the layers' position (layer_id")
               for n in report.notes)
    assert any("layer_id" in f.message for f in report.recompiles)
    assert not any(n.startswith("diagnosed ") for n in report.notes)


def test_model_restored_exactly_also_when_the_diagnosis_raises() -> None:
    model = tiny_hf("llama", num_hidden_layers=4)
    stack, modules = model.model.layers, list(model.model.layers)
    config_before = model.config.to_dict()
    positions = [m.self_attn.layer_idx for m in modules]
    with layer_subset.representative_layers(model) as cut:
        assert cut.kept == [0, 3] and model.config.num_hidden_layers == 2
        assert list(model.model.layers) == [modules[0], modules[3]]
        assert modules[3].self_attn.layer_idx == 1  # a cache of two layers is indexed 0 and 1

    def broken(m: nn.Module) -> None:
        assert len(m.model.layers) == 2 and m.config.num_hidden_layers == 2  # it ran on the subset
        raise ValueError("the user's loop fails")

    with pytest.raises(ModelRunError):
        diagnose(model, driver=broken, layers="representative")
    assert model.model.layers is stack and list(stack) == modules
    assert model.config.to_dict() == config_before
    assert [m.self_attn.layer_idx for m in modules] == positions
    assert dict(model.named_modules()).keys() == dict(tiny_hf("llama", num_hidden_layers=4).named_modules()).keys()
    with pytest.raises(InputError):
        diagnose(model, layers="some")


def test_hf_findings_match_the_whole_model() -> None:
    """A 4-layer HF Llama: the subset's findings (DynamicCache recompiles) and graph counts are the whole model's."""
    model = tiny_hf("llama", num_hidden_layers=4)
    whole = diagnose(model, decode_steps=2, backend="eager", layers="all")
    subset = diagnose(model, decode_steps=2, backend="eager", layers="representative")
    assert [f.key() for f in subset.findings] == [f.key() for f in whole.findings]
    assert [f.module_paths for f in subset.findings] == [f.module_paths for f in whole.findings]
    assert (subset.stats.graphs, subset.stats.recompiles, subset.stats.graph_breaks) == \
        (whole.stats.graphs, whole.stats.recompiles, whole.stats.graph_breaks)
    assert any(n.startswith("diagnosed 2 of 4 layers") for n in subset.notes)


def test_generate_cache_made_during_the_subset_is_not_kept_for_the_whole_model() -> None:
    from graphfix.optimize import hf_runtime

    model = tiny_hf("llama", num_hidden_layers=4)
    rt = hf_runtime.install(model, max_seq_len=16, max_batch_size=1)
    with layer_subset.representative_layers(model):
        assert len(rt.cache_for(1).layers) == 2  # a user's loop calling generate() inside the diagnosis
    assert len(rt.cache_for(1).layers) == 4

