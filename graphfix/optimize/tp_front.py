"""``optimize(model, tp=N)``: the HF front door's engine over this rank's shard of the model.

Run under ``torchrun --nproc-per-node N``, every rank calls ``optimize(model, tp=N)`` on the same
single-device model. Everything ``optimize`` does without ``tp`` happens as before (diagnosis,
passes, the compiled runtime for the caller's own loop, verification); the one difference is the
engine that serves ``model.generate``: its decoder is this rank's shard (``graphfix.engine.tp.shard``)
instead of a decoder sharing the model's storage, and the all-reduce is chosen before it compiles.
The verification then runs ``generate`` on the sharded engine on every rank against the original
model's tokens and logits, so a verified result is a verified tensor-parallel model.

The shard's weights are copies: each process holds the model plus its shard (``1 + 1/N`` of it).
For models that do not fit one device, ``graphfix.engine.tp.load_sharded`` reads the shard alone.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from graphfix.errors import InputError


def prepare(model: nn.Module, kind: str, tp: int, driver: Any, compile: bool) -> Any:
    """Check ``optimize``'s arguments for ``tp`` and join the process group; returns the ``TPGroup``."""
    from graphfix.engine.tp import init_tp

    if kind != "hf":
        raise InputError(f"optimize(tp={tp}) serves Hugging Face Llama/Mistral/Qwen2 models (this one is {kind!r})",
                         hint="for Meta checkpoints: graphfix.engine.tp.load_sharded(folder) with the Generator")
    if driver is not None:
        raise InputError(f"optimize(tp={tp}) shards the engine behind generate(); a custom driver calls forward",
                         hint="drop driver=, or use graphfix.shard(model) and graphfix's Generator")
    if not compile:
        raise InputError(f"optimize(tp={tp}) needs compile=True (the sharded engine is compiled)")
    return init_tp(tp)


def sharded_decoder(model: nn.Module, tp: Any, *, max_batch_size: int, max_seq_len: int) -> Any:
    """This rank's decoder of ``model`` with the all-reduce chosen; ``tp_note`` on it says what was done."""
    from graphfix.engine.tp import choose_all_reduce, shard

    decoder = shard(model, tp, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    choice = choose_all_reduce(tp, decoder)
    decoder.tp_note = f"tensor parallel: {tp.describe()}; {decoder.shard_plan.describe()}; {choice.describe()}"
    return decoder
