"""The generation engine: compiled prefill and decode over a ``StepModel``.

``Generator(model)`` drives any ``StepModel`` (``graphfix.engine.protocol``):

- **prefill** runs the prompt in chunks; each chunk is padded to a multiple of 16
  and compiled once with a dynamic length (``prefill="dynamic"``), or padded up to
  a length bucket with one static graph per bucket (``prefill="buckets"``);
- **decode** is one token per row per call, compiled with ``fullgraph=True`` and,
  on CUDA with Inductor, CUDA graphs (``triton.cudagraphs``, i.e. ``reduce-overhead``).
  The decode graph *returns nothing*: it samples the next token and writes it, the
  positions, the per-row ``done`` flags and the output buffer into fixed-address
  state tensors (``torch._dynamo.mark_static_address``), which CUDA-graph trees
  allow to be mutated. So no graph output is ever kept across replays (the
  "tensor output of CUDAGraphs that has been overwritten" failure cannot happen) and
  nothing is cloned; ``torch.compiler.cudagraph_mark_step_begin()`` still marks each step;
- **sampling** (``graphfix.engine.sampling``) is inside the graphs: no host sync per
  token. EOS is a device ``done`` flag per row; the host reads ``done.all()`` every
  ``check_interval`` tokens, and finished rows keep stepping on a pad token until
  then (fixed shapes). ``stream`` callbacks get the new tokens every
  ``stream_interval`` tokens (1: every token, at the price of one sync per token).

Rows keep their tokens at positions ``0 .. len-1`` whatever their length: the
prompt matrix is padded on the right, and the padding sits at positions above a
row's prompt, where decode overwrites it before any query can attend to it. One
``(B,)`` gather picks each row's last prompt logits. ``warmup()`` compiles every
graph the configured batch sizes, buckets and sampling modes need, so that no
compilation happens while serving (``torch.compiler.set_stance("fail_on_recompile")``
holds after it, see tests/test_runtime.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graphfix.engine.protocol import StepModel, compile_key, per_row_positions, supports_kv_len, supports_logits_index
from graphfix.engine.results import GenerationResult, StreamChunk
from graphfix.engine.sampling import MODES, SamplingParams
from graphfix.engine.speculative import speculators
from graphfix.engine.step_graphs import _BatchState, _Clock, _device_of, _make_decode, _make_first, _make_prefill
from graphfix.errors import InputError
from graphfix.rewrite.codeobj import own_code

DEFAULT_BUCKETS = (16, 64, 256, 512, 1024, 2048)
PAD_MULTIPLE = 16
WARMUP_NEW_TOKENS = 4  # 1 from prefill + 3 decode calls: CUDA-graph trees warm up, record, then replay


class Generator:
    """Compiled generation over a ``StepModel``.

    ``compile``: ``False`` runs the same functions eagerly. ``backend``: any
    ``torch.compile`` backend (``inductor`` on GPU; ``aot_eager``/``eager`` for fast CPU
    tests). ``prefill``: ``"dynamic"`` or ``"buckets"`` (``buckets`` lengths; longer
    prompts run in chunks of the largest). ``cuda_graphs``: decode under CUDA graphs
    (CUDA + Inductor only). ``inductor_options``: passed to Inductor (e.g.
    ``{"coordinate_descent_tuning": True}``). ``kv_buckets``: decode graphs per attended
    cache length (e.g. ``(256, 1024, 4096)``; the cache length is always the last): a step
    attends to the smallest bucket that holds every row's position, so a long cache costs
    short sequences nothing; ``None`` attends to the whole cache (one decode graph).

    Compiled callables are kept per model ``compile_key`` (``protocol.compile_key``): a
    ``LlamaDecoder`` switched with ``use_decode_kernels`` uses the graphs of its current setting,
    so each setting warmed up once serves again without a recompile.
    """

    def __init__(self, model: StepModel, *, compile: bool = True, backend: str = "inductor",
                 prefill: str = "dynamic", buckets: Sequence[int] = DEFAULT_BUCKETS, max_prefill_chunk: int = 2048,
                 cuda_graphs: bool = True, inductor_options: dict[str, Any] | None = None,
                 stream_interval: int = 8, check_interval: int = 16, max_eos: int = 8,
                 kv_buckets: Sequence[int] | None = None, graph_prefill: Sequence[int] = (16,),
                 speculate: str | None = None, draft: StepModel | None = None) -> None:
        if prefill not in ("dynamic", "buckets"):
            raise ValueError(f"prefill must be 'dynamic' or 'buckets', got {prefill!r}")
        self.model = model
        self.device = _device_of(model)
        self.compile = compile
        self.backend = backend
        self.prefill_mode = prefill
        seq = model.max_seq_len
        self.buckets = sorted({min(int(b), seq) for b in buckets}) or [seq]
        self.max_prefill_chunk = min(max_prefill_chunk, seq)
        self.kv_buckets: list[int | None] = [None]
        if kv_buckets and supports_kv_len(model):
            self.kv_buckets = sorted({min(int(b), seq) for b in kv_buckets} | {seq})
        self.cuda_graphs = cuda_graphs and compile and backend == "inductor" and self.device.type == "cuda"
        self.graph_prefill = {int(n) for n in graph_prefill} if compile and prefill == "dynamic" else set()
        self.inductor_options = dict(inductor_options or {})
        self.stream_interval = max(1, stream_interval)
        self.check_interval = max(1, check_interval)
        self.max_eos = max_eos
        self._states: dict[int, _BatchState] = {}
        self._fns: dict[tuple, Callable] = {}
        self._codes: list[Any] = []
        self._use_index = supports_logits_index(model)
        self._clock = _Clock(self.device)
        self.speculate, self.draft = speculate, draft  # speculative decoding: graphfix.engine.speculative
        self._speculators: dict[str, Any] = {}
        speculators(self, speculate, draft, self._speculators)  # a bad spec or a missing draft fails here

    # -- compiled functions -------------------------------------------------------------------

    def _compiled(self, fn: Callable, cuda_graphs: bool, dynamic: bool | None = False) -> Callable:
        """``dynamic=False`` for every static graph: Dynamo's automatic dynamic shapes key their state on
        (file, line, name), which our per-key code copies share, and would otherwise make the second
        bucket or batch size of a function dynamic."""
        if not self.compile:
            return fn
        kwargs: dict[str, Any] = {"fullgraph": True, "backend": self.backend, "dynamic": dynamic}
        if self.backend == "inductor":
            options = dict(self.inductor_options)
            if cuda_graphs:
                options["triton.cudagraphs"] = True
            if options:
                kwargs["options"] = options
        own = own_code(fn)  # per key: Dynamo caches per code object
        self._codes.append(own.__code__)
        return torch.compile(own, **kwargs)

    def graphs(self) -> dict[str, int]:
        """Graphs compiled so far per kind of function (``prefill``, ``first``, ``decode``), over their keys."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        out: dict[str, int] = {}
        for code in self._codes:
            named = ("decode", "first", "spec_round", "spec_start")
            kind = code.co_name if code.co_name in named else "prefill"
            out[kind] = out.get(kind, 0) + len(_debug_get_cache_entry_list(code))
        return out

    def recompiles(self) -> int:
        """Graphs beyond the first of each compiled function (each key has its own code object)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return sum(max(0, len(_debug_get_cache_entry_list(code)) - 1) for code in self._codes)

    def _key(self, key: tuple) -> tuple:
        """``key`` with the model's ``compile_key`` for the kinds that trace the model (not ``first``).

        Dynamo guards a traced step on the model attributes it read (e.g. ``decode_kernels``): a
        callable compiled under one setting fails its guards under another and recompiles. Keying
        the callables (each its own code object, ``own_code``) by the setting gives every setting
        its own graphs, so both can be warmed up and then used alternately with no recompile.
        """
        return key if key[0] == "first" else (*key, compile_key(self.model))

    def _fn(self, key: tuple) -> Callable:
        full = self._key(key)
        fn = self._fns.get(full)
        if fn is None:
            kind = key[0]
            if kind == "prefill":
                dynamic = None if self.prefill_mode == "dynamic" else False  # dynamic: mark_dynamic on T only
                fn = self._compiled(_make_prefill(self.model, self._use_index), False, dynamic)
            elif kind == "prefill-graph":
                fn = self._compiled(_make_prefill(self.model, self._use_index), self.cuda_graphs)
            elif kind == "first":
                fn = self._compiled(_make_first(key[2]), False)
            else:
                fn = self._compiled(_make_decode(self.model, key[2], self.model.max_seq_len - 1, key[3]),
                                    self.cuda_graphs)
            self._fns[full] = fn
        return fn

    def _kv_len(self, needed: int) -> int | None:
        """The smallest decode bucket holding ``needed`` slots (positions ``0 .. needed-1``)."""
        for b in self.kv_buckets:
            if b is None or b >= needed:
                return b
        return self.kv_buckets[-1]

    def _state(self, batch: int) -> _BatchState:
        state = self._states.get(batch)
        if state is None:
            state = self._states[batch] = _BatchState(batch, self.model.max_seq_len, self.device, self.max_eos)
        return state

    # -- prompts ------------------------------------------------------------------------------

    def _rows(self, prompts: Any, attention_mask: torch.Tensor | None) -> list[list[int]]:
        """Token lists from a list of lists, a ``(B, L)`` tensor (left padding removed with ``attention_mask``)."""
        if isinstance(prompts, torch.Tensor):
            ids = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
            if attention_mask is not None:
                keep = attention_mask.bool().tolist() if attention_mask.dim() == 2 else [attention_mask.bool().tolist()]
                ids = [[t for t, k in zip(row, m) if k] for row, m in zip(ids, keep)]
            return ids
        rows = [list(map(int, p)) for p in prompts]
        return rows

    def _chunk_len(self, remaining: int) -> int:
        if self.prefill_mode == "buckets":
            want = min(remaining, self.buckets[-1])
            return next(b for b in self.buckets if b >= want)
        want = min(remaining, self.max_prefill_chunk)
        return -(-want // PAD_MULTIPLE) * PAD_MULTIPLE

    def _prefill(self, rows: list[list[int]], state: _BatchState) -> torch.Tensor:
        batch, seq = len(rows), self.model.max_seq_len
        lengths = [len(r) for r in rows]
        longest = max(lengths)
        plan, start = [], 0
        while start < longest:
            size = self._chunk_len(longest - start)
            plan.append((start, size))
            start += size
        padded = torch.zeros(batch, start, dtype=torch.long)
        for b, r in enumerate(rows):
            padded[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        padded = padded.to(self.device, non_blocking=True)
        last_idx = torch.tensor([n - 1 for n in lengths], dtype=torch.long).to(self.device, non_blocking=True)
        state.lengths.copy_(last_idx + 1)
        last = None
        graphed = len(plan) == 1 and plan[0][1] in self.graph_prefill
        for start, size in plan:
            tokens = padded[:, start:start + size].clone()  # never a view: views add guards on their base
            pos = torch.arange(start, start + size, device=self.device).clamp_(max=seq - 1)
            pos = pos.unsqueeze(0).expand(batch, size).contiguous()
            gather = (last_idx - start).clamp(0, size - 1)
            if graphed:  # its logits live in the graph's pool until the next replay: used at once by "first"
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return self._fn(("prefill-graph", batch, size))(tokens, pos, gather)
            key = ("prefill", batch, size if self.prefill_mode == "buckets" else "dynamic")
            if self.compile and self.prefill_mode == "dynamic":
                bound = max(seq, self.max_prefill_chunk) + PAD_MULTIPLE
                torch._dynamo.mark_dynamic(tokens, 1, min=2, max=bound)
                torch._dynamo.mark_dynamic(pos, 1, min=2, max=bound)
            logits = self._fn(key)(tokens, pos, gather)
            if last is None:
                last = logits
            else:
                inside = ((last_idx >= start) & (last_idx < start + size)).unsqueeze(-1)
                last = torch.where(inside, logits, last)
        return last

    # -- requests -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Rewind every batch state and the model (no reallocation: all addresses stay)."""
        for state in self._states.values():
            state.rewind()
        self.model.reset()

    def generate(self, prompts: Any, max_new_tokens: int, *, sampling: SamplingParams | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, stream: Callable[[StreamChunk], None] | None = None,
                 stream_interval: int | None = None, record_logits: bool = False,
                 speculate: str | None = None) -> GenerationResult:
        """Generate ``max_new_tokens`` per row (fewer when every row hit an EOS).

        ``prompts``: token-id lists of any lengths, or a ``(B, L)`` tensor (with
        ``attention_mask`` for left-padded rows, Hugging Face style). ``record_logits``: keep each
        step's float32 logits (``GenerationResult.logits``, ``(steps, B, V)`` on CPU), through decode
        graphs of their own that also return them (verification; serving never pays for the copy).
        ``speculate``: this request's speculation (``"lookup:4"``, ``"draft:4"``, ``"none"``); default the generator's.
        """
        sampling = sampling or SamplingParams()
        rows = self._rows(prompts, attention_mask)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self._check(rows, max_new_tokens, eos)
        batch = len(rows)
        state = self._state(batch)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        spec = speculators(self, self.speculate if speculate is None else speculate, self.draft, self._speculators)
        if spec is not None:
            if record_logits:
                raise InputError("speculative decoding does not record logits", hint="speculate='none'")
            return spec.generate(rows, max_new_tokens, sampling, eos, pad, stream,
                                 max(1, stream_interval or self.stream_interval))
        interval = max(1, stream_interval or self.stream_interval)
        mode = sampling.mode
        wall = time.perf_counter()
        with torch.no_grad():
            self.model.reset()
            self._load_request(state, sampling, eos, pad)
            t0 = self._clock.mark()
            logits = self._prefill(rows, state)
            self._fn(("first", batch, mode))(logits, state.tokens, state.pos, state.done, state.out, state.step,
                                              state.lengths, state.seeds, state.temperature, state.top_k,
                                              state.top_p, state.eos)
            recorded = [logits.detach().float().cpu()] if record_logits else []
            del logits  # a CUDA-graphed prefill's output: the next replay reuses its memory
            t1 = self._clock.mark()
            longest = max(len(r) for r in rows)
            args = state.args()
            produced, streamed = 1, 0
            stopped = bool(eos) and self.check_interval == 1 and bool(state.done.all())
            while produced < max_new_tokens and not stopped:
                # this call writes and attends at positions <= longest + produced - 1 (host arithmetic, no sync)
                key = ("decode", batch, mode, self._kv_len(longest + produced))
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self._fn(key)(*args)
                if record_logits:
                    recorded.append(logits.detach().float().cpu())  # copied before the next replay reuses it
                del logits  # the graph's static output: never held across the next replay
                produced += 1
                if stream is not None and produced - streamed >= interval:
                    streamed = self._emit(stream, state, streamed, produced)
                if eos and produced % self.check_interval == 0:
                    stopped = bool(state.done.all())
            t2 = self._clock.mark()
            if stream is not None and streamed < produced:
                self._emit(stream, state, streamed, produced)
            out = state.out[:, :produced].cpu().tolist()
            finished = state.done.cpu().tolist()
        total = time.perf_counter() - wall
        tokens = [_trim(row, eos) for row in out]
        return GenerationResult(tokens=tokens, prompt_lengths=[len(r) for r in rows], finished=finished,
                                steps=produced, ttft_s=self._clock.seconds(t0, t1),
                                decode_s=self._clock.seconds(t1, t2), total_s=total,
                                logits=torch.stack(recorded) if recorded else None)

    def _check(self, rows: list[list[int]], max_new_tokens: int, eos: list[int]) -> None:
        model = self.model
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("every prompt needs at least one token")
        if len(rows) > model.max_batch_size:
            raise InputError(f"{len(rows)} prompts but the cache holds {model.max_batch_size} rows",
                             hint="build the model with a larger max_batch_size")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > model.max_seq_len:
            raise InputError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the cache length "
                             f"{model.max_seq_len}", hint="shorten the request or allocate a longer cache")
        if len(eos) > self.max_eos:
            raise InputError(f"at most {self.max_eos} EOS ids, got {len(eos)}")
        if len(rows) > 1 and not per_row_positions(model) and len({len(r) for r in rows}) > 1:
            raise InputError("this model shares positions across rows: batched prompts must have equal lengths",
                             hint="convert it with graphfix.engine.from_meta for per-row positions")

    def _load_request(self, state: _BatchState, sampling: SamplingParams, eos: list[int], pad: int) -> None:
        batch = state.batch
        state.rewind()
        state.seeds.copy_(torch.arange(batch) + sampling.seed)
        state.temperature.fill_(sampling.temperature if sampling.temperature > 0 else 1.0)
        state.top_k.fill_(sampling.top_k or 0)
        state.top_p.fill_(sampling.top_p if sampling.top_p is not None else 1.0)
        eos_row = torch.full((self.max_eos,), -1, dtype=torch.long)
        eos_row[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        state.eos.copy_(eos_row)
        state.pad.fill_(pad)

    def _emit(self, stream: Callable[[StreamChunk], None], state: _BatchState, start: int, end: int) -> int:
        stream(StreamChunk(tokens=state.out[:, start:end].cpu(), start=start, finished=state.done.cpu().tolist()))
        return end

    # -- warmup -------------------------------------------------------------------------------

    def warmup(self, batch_sizes: Sequence[int] = (1,), modes: Sequence[str] = ("greedy",),
               prompt_lengths: Sequence[int] | None = None, decode: bool = True,
               kv_lengths: Sequence[int] | None = None) -> dict[str, float]:
        """Compile (and record CUDA graphs for) every graph these requests need; returns seconds per part.

        ``prompt_lengths``: defaults to every bucket (``buckets``) or one length (``dynamic``).
        ``decode=False`` compiles prefill and the first-token graph only (time-to-first-token serving).
        ``kv_lengths``: the decode buckets to warm (default: all of ``kv_buckets``).
        """
        seq = self.model.max_seq_len
        if prompt_lengths is None:
            prompt_lengths = self.buckets if self.prefill_mode == "buckets" else [min(32, seq - WARMUP_NEW_TOKENS)]
            prompt_lengths = [*prompt_lengths, *(n for n in sorted(self.graph_prefill) if n not in prompt_lengths)]
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown sampling mode {mode!r}; one of {MODES}")
        params = {"greedy": SamplingParams(), "sample": SamplingParams(temperature=1.0),
                  "filtered": SamplingParams(temperature=1.0, top_k=50, top_p=0.9)}
        timings: dict[str, float] = {}
        new = WARMUP_NEW_TOKENS if decode else 1

        def run(batch: int, length: int, mode: str, label: str) -> None:
            length = max(1, min(int(length), seq - new))
            t = time.perf_counter()
            # a CUDA-graphed prefill is run, then recorded, then replayed: three requests reach its replay
            for _ in range(3 if self._chunk_len(length) in self.graph_prefill and length <= self._chunk_len(length) else 1):
                self.generate([[0] * length] * batch, new, sampling=params[mode])
            timings[f"batch{batch}/{label}/{mode}"] = time.perf_counter() - t

        for batch in batch_sizes:
            for i, length in enumerate(prompt_lengths):
                # the prefill graph does not depend on the mode: one mode per extra length
                for mode in modes if i == 0 else modes[:1]:
                    run(batch, length, mode, f"len{length}")
            if not decode or self.kv_buckets == [None]:
                continue
            wanted = self.kv_buckets if kv_lengths is None else [self._kv_len(int(k)) for k in kv_lengths]
            for kv in sorted(set(wanted)):
                below = [b for b in self.kv_buckets if b < kv]
                start = below[-1] if below else 1  # decode positions start..start+2 land in this bucket
                for mode in modes:
                    if self._key(("decode", batch, mode, kv)) not in self._fns:
                        run(batch, start, mode, f"kv{kv}")
        self.reset()
        return timings


def _trim(row: list[int], eos: list[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row
