"""``graphfix.rewrite.codeobj.own_code``: a function copy that Dynamo compiles apart from the original."""

from __future__ import annotations

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from graphfix.rewrite.codeobj import own_code


def _scaled(x: torch.Tensor, *, scale: float = 2.0) -> torch.Tensor:
    """Doc."""
    return x * scale


def test_the_copy_keeps_what_it_runs_and_compiles_into_its_own_cache():
    copy = own_code(_scaled)
    assert copy.__code__ is not _scaled.__code__ and copy.__code__ == _scaled.__code__
    assert (copy.__name__, copy.__qualname__, copy.__doc__, copy.__module__, copy.__kwdefaults__) == (
        _scaled.__name__, _scaled.__qualname__, _scaled.__doc__, _scaled.__module__, {"scale": 2.0})
    out = torch.compile(copy, backend="eager", fullgraph=True)(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert len(_debug_get_cache_entry_list(copy.__code__)) == 1
    assert _debug_get_cache_entry_list(_scaled.__code__) == []  # the original's cache is untouched
