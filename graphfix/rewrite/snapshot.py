"""Put a model back exactly as it was before a set of passes, when optimize cannot finish.

Passes rewrite by swapping submodules, installing methods on instances and replacing
attributes; they never change a tensor in place (the pass contract) and never touch a
class. So a model's state before the passes is fully described by each module's
``__dict__`` with its containers (``_modules``, ``_buffers``, ``_parameters``, hook
dicts, lists and dicts of the user's own) copied one level deep: restoring those puts
back every original submodule, method and attribute, and drops what the passes added,
with the same parameter objects (nothing is copied, so memory stays flat).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

_CONTAINERS = (dict, list, set)


def _copy_containers(state: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.copy(v) if isinstance(v, _CONTAINERS) else v for k, v in state.items()}


@dataclasses.dataclass
class ModelSnapshot:
    """The attribute state of every module of a model, taken before rewriting it."""

    modules: list[tuple[nn.Module, dict[str, Any]]]

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        return cls([(m, _copy_containers(m.__dict__)) for m in model.modules()])

    def restore(self) -> None:
        """Every module's attributes as they were when the snapshot was taken."""
        for module, state in self.modules:
            module.__dict__.clear()
            module.__dict__.update(_copy_containers(state))
