"""The HF front door on the engine: ``model.generate`` served by graphfix's generation engine.

``graphfix.optimize`` on a Hugging Face Llama, Mistral or Qwen2 model builds a ``LlamaDecoder``
that **shares** the model's storage (``engine.from_hf(..., share=True)``: fused q/k/v and
gate/up weights, the HF projections keep working on views of them, so memory stays flat)
and a ``Generator`` over it: the same engine as ``graphfix generate`` and the benchmark
(fused weights, decode kernels and PDL on a GPU, CUDA-graph decode, prefill chunks, decode
graphs per attended cache length so a long cache costs short sequences nothing).

``model.generate(...)`` then goes to the engine whenever the request is one it serves
exactly: token ids (left-padded with an ``attention_mask`` or not), greedy or sampling
with temperature, top-k and top-p, EOS ids, ``max_new_tokens``/``max_length``, a
``min_new_tokens`` that covers the whole request, up to ``max_batch_size`` rows that fit the
cache (``min_new_tokens`` only without EOS ids: transformers masks EOS logits until then,
which the engine does not), and ``prompt_lookup_num_tokens`` (the engine's own prompt lookup,
``engine.speculative``, at most ``MAX_K`` tokens a round: greedy output unchanged). Anything
else (beams, several sequences per prompt, logits processors and penalties, streamers, scores and logits in the output, a cache of the caller's) is served
by transformers' own ``generate`` on the runtime of ``hf_runtime`` (compiled, or the original
forward), and the reason is counted and said once (``EngineDoor.fallbacks``). The output is
what transformers returns: the prompt followed by the new tokens, rows that stopped at an
EOS padded with ``pad_token_id``.

Sampling draws from the engine's counter-based sampler (``engine.sampling``), seeded from
torch's global generator: the same distribution as transformers', not the same draws.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from graphfix.engine.sampling import SamplingParams
from graphfix.engine.speculative import MAX_K

DEFAULT_KV_BUCKETS = (64, 256, 1024, 4096, 16384)
"""Decode graphs per attended cache length: a step attends to the smallest that holds every row."""

ENGINE_KWARGS = frozenset({"attention_mask", "generation_config", "disable_compile", "use_cache",
                           "return_dict_in_generate"})
"""``generate`` keyword arguments the engine handles itself (the rest must be generation-config fields)."""

_SAME_AS_DEFAULT = ("num_beams", "num_beam_groups", "num_return_sequences", "penalty_alpha", "repetition_penalty",
                    "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "force_words_ids",
                    "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                    "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale", "min_p",
                    "typical_p", "epsilon_cutoff", "eta_cutoff", "diversity_penalty", "low_memory", "watermarking_config",
                    "constraints", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
                    "assistant_early_exit", "stop_strings", "top_h", "min_length",
                    "max_time", "renormalize_logits", "remove_invalid_values", "cache_implementation")
"""Generation-config fields that change what ``generate`` does beyond what the engine serves."""


class EngineFallbackWarning(UserWarning):
    """A ``generate`` call the engine does not serve ran on transformers' own ``generate`` (said once per reason)."""


@dataclasses.dataclass
class EngineDoor:
    """The engine behind one HF model's ``generate``."""

    decoder: nn.Module
    generator: Any
    max_batch_size: int
    max_seq_len: int
    served: int = 0
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    warned: set[str] = dataclasses.field(default_factory=set)

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"graphfix: generate() runs on transformers' generate, not the engine: {reason}",
                          EngineFallbackWarning, stacklevel=4)


def build(model: nn.Module, *, max_seq_len: int, max_batch_size: int, backend: str, cuda_graphs: bool,
          kv_buckets: tuple[int, ...] = DEFAULT_KV_BUCKETS, tp: Any = None) -> tuple[EngineDoor | None, str | None]:
    """The engine for ``model`` (sharing its weights; with ``tp``, over this rank's shard), or ``(None, why not)``."""
    from graphfix.engine import Generator, from_hf
    from graphfix.errors import GraphfixError

    try:
        if tp is not None:  # optimize(tp=N): the shard is a copy (graphfix.optimize.tp_front)
            from graphfix.optimize import tp_front

            decoder = tp_front.sharded_decoder(model, tp, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        else:
            decoder = from_hf(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, share=True)
    except (GraphfixError, AttributeError, TypeError, ValueError) as exc:
        return None, f"the engine does not build this architecture ({str(exc).splitlines()[0]})"
    if decoder.norm.weight.device.type == "cuda":  # the benchmark's fastest variant (`pdl`): decode kernels, PDL
        from graphfix.engine.kernels import use_cublas

        use_cublas(decoder)
        decoder.use_decode_kernels(True, pdl=True)
    buckets = tuple(b for b in kv_buckets if b < decoder.max_seq_len)
    generator = Generator(decoder, backend=backend, cuda_graphs=cuda_graphs, kv_buckets=buckets or None)
    return EngineDoor(decoder, generator, max_batch_size, decoder.max_seq_len), None


def request(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """What the engine needs to serve this ``generate`` call, or ``(None, why it cannot)``."""
    if len(args) > 1:
        return None, "positional arguments beyond the prompt"
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.is_floating_point():
        return None, "the prompt is not a (batch, seq) tensor of token ids (inputs_embeds, or no prompt)"
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    fields = {k: v for k, v in kwargs.items() if k not in ENGINE_KWARGS | {"input_ids", "inputs"}}
    unused = config.update(**fields)
    if unused:
        return None, f"arguments the engine does not take ({', '.join(sorted(unused))})"
    default = type(config)()
    changed = [f for f in _SAME_AS_DEFAULT if _set(getattr(config, f, None), getattr(default, f, None))]
    if changed:
        return None, f"generation options the engine does not serve ({', '.join(changed)})"
    if kwargs.get("use_cache") is False or config.use_cache is False:
        return None, "use_cache=False"
    prompt_len = inputs.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    if new is None or new < 1:
        return None, "no new tokens asked for"
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if config.min_new_tokens and eos:
        return None, "min_new_tokens with EOS ids (transformers masks EOS until then; the engine does not)"
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    if config.do_sample:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # torch.manual_seed fixes it, as it fixes transformers' draws
        sampling = SamplingParams(temperature=config.temperature or 1.0, top_k=config.top_k or None,
                                  top_p=config.top_p if config.top_p is not None else None, seed=seed)
    else:
        sampling = SamplingParams()
    lookup = getattr(config, "prompt_lookup_num_tokens", None)  # transformers' prompt lookup: the engine's lookup
    speculate = f"lookup:{min(int(lookup), MAX_K)}" if lookup else "none"
    return {"inputs": inputs, "attention_mask": kwargs.get("attention_mask"), "new": int(new), "eos": eos,
            "speculate": speculate,
            "pad": pad, "sampling": sampling, "dict": bool(kwargs.get("return_dict_in_generate")
                                                          or config.return_dict_in_generate)}, ""


def _set(value: Any, default: Any) -> bool:
    """Whether a generation option is set to something other than its default (``None``/``False``/``0`` are unset)."""
    if value is None or value is False or (isinstance(value, (int, float, list, dict)) and not value):
        return False
    return value != default


def serve(door: EngineDoor, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
    """``generate``'s output from the engine, or ``None`` when the call is not one it serves (reason counted)."""
    req, why = request(model, args, kwargs)
    if req is not None:
        inputs = req["inputs"]
        if inputs.shape[0] > door.max_batch_size:
            req, why = None, f"a batch of {inputs.shape[0]} is more than max_batch_size {door.max_batch_size}"
        elif inputs.shape[1] + req["new"] > door.max_seq_len:
            req, why = None, f"{inputs.shape[1]} + {req['new']} tokens do not fit the cache of {door.max_seq_len}"
    if req is None:
        door.fallback(why)
        return None
    result = door.generator.generate(req["inputs"], req["new"], sampling=req["sampling"], eos_token_id=req["eos"],
                                     pad_token_id=req["pad"], attention_mask=req["attention_mask"],
                                     speculate=req["speculate"])
    door.served += 1
    return as_hf_output(req["inputs"], result.tokens, req["pad"], req["dict"])


def as_hf_output(inputs: torch.Tensor, rows: list[list[int]], pad: int, as_dict: bool) -> Any:
    """What transformers' ``generate`` returns: the prompt, then each row's tokens padded after its EOS."""
    width = max(len(r) for r in rows)
    new = torch.full((len(rows), width), pad, dtype=inputs.dtype)
    for b, row in enumerate(rows):
        new[b, : len(row)] = torch.tensor(row, dtype=inputs.dtype)
    sequences = torch.cat([inputs, new.to(inputs.device)], dim=1)
    if not as_dict:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences)
