"""Speculative decoding on the engine: prompt lookup or a draft model, verified by the target in one step.

A *round* proposes ``k`` tokens per row, runs the target once over ``k + 1`` tokens (the
row's last token and the proposal, at the row's own positions ``n-1 .. n-1+k``), and emits
the longest accepted prefix plus one token of the target's own: 1 to ``k + 1`` tokens per
row per target step. A whole round is one compiled function (``fullgraph``, fixed ``k``,
CUDA-graphed on CUDA with Inductor) that writes into fixed-address state tensors, like the
plain decode graph: proposals, the draft's ``k`` steps, the verify step, acceptance, EOS and
the per-row lengths all stay on the device. The host reads one flag per round (whether every
row is done), the longest row (which cache prefix the next round attends to) and, for lookup,
how many of the next round's proposals are real (each round makes the next one's at its end).

- **No-match fallback** (lookup). When no running row has an n-gram match, the next round is a
  plain one-token step (``k = 0``: ``spec_rules.plain_token``) instead of a ``k + 1``-token verify
  step of padding; eager, a round verifies only as many proposals as the best row has (a smaller
  step costs less on a CPU). Compiled, that is one more round graph per setting (verify and plain),
  both run by the first request; off by default under CUDA graphs (``SpecConfig.fallback``).

- **Exactness.** Greedy: every emitted token is the target's argmax given the tokens
  before it (``spec_rules.accept_greedy``), so the output is the plain decode's, up to the
  rounding of a ``k + 1``-token step against a one-token step. Sampling: the standard
  accept/reject rule (``spec_rules.accept_sampled``) keeps the target's distribution
  (tests/test_speculative_sampling.py checks it statistically).
- **Rejected tokens need no clean-up.** Their keys and values sit in cache slots above the
  row's new length; the next round writes those slots before any query can see them (the
  query at position ``p`` attends to slots ``<= p``, and the step writes all its slots
  first), so the static cache and the position mask hide them, in the target and the draft.
- **The draft** (any ``StepModel`` with the target's vocabulary, e.g.
  ``draft.truncated_draft(target, n_layers)``) keeps its own static cache. Its first step of a
  round feeds the row's last two tokens (the token before the last may be a draft token it
  never cached: all ``k`` accepted), then ``k - 1`` one-token steps.
- **Prompt lookup** (``lookup``) proposes from the row's own tokens (``spec_rules.lookup_proposals``):
  no second model, free on the device, strong when the output quotes the input.

Positions past the cache are clamped to its last slot; only proposals beyond the request's
length go there, and their tokens are never emitted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graphfix.engine.protocol import StepModel, compile_key, supports_shared_rows
from graphfix.engine.sampling import SamplingParams, sample
from graphfix.engine.spec_rules import (
    SALT_DRAFT,
    accept_greedy,
    accept_sampled,
    lookup_match,
    plain_token,
    race,
    target_probs,
)
from graphfix.engine.step_graphs import _is_eos
from graphfix.errors import InputError

KINDS = ("lookup", "draft")
DEFAULT_K = 4
MAX_K = 16
GRAPH_CALLS = 3  # CUDA-graph trees warm up, record, then replay: a new round graph runs at least this often
STATS = 4  # per-row counters of a request (_SpecState.stats)


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """What to speculate with: ``kind`` ``lookup`` or ``draft``, ``k`` proposed tokens per round.

    Lookup only: ``max_ngram`` / ``min_ngram``, the n-gram sizes looked up (a match shorter than
    ``min_ngram`` counts as none). ``fallback``: a round where no running row has a match runs a
    plain one-token step instead of verifying ``k + 1`` tokens of padding; ``None`` (default) turns
    it on unless the rounds are CUDA-graphed (there the choice would add a graph per setting to
    warm up, and a padded verify step costs little more than a one-token step: the H200 figures).
    """

    kind: str
    k: int = DEFAULT_K
    max_ngram: int = 3
    min_ngram: int = 1
    fallback: bool | None = None

    @classmethod
    def parse(cls, spec: str | SpecConfig | None) -> SpecConfig | None:
        """``"lookup"``, ``"lookup:4"``, ``"draft"``, ``"draft:3"`` (or ``None``/``""``: off)."""
        if not spec or isinstance(spec, SpecConfig):
            return spec or None
        text = str(spec).strip().lower()
        if not text or text == "none":
            return None
        kind, _, k = text.partition(":")
        if kind not in KINDS:
            raise InputError(f"unknown speculation {spec!r}", hint="lookup[:k] or draft[:k], e.g. lookup:4")
        try:
            n = int(k) if k else DEFAULT_K
        except ValueError as exc:
            raise InputError(f"speculation {spec!r}: k must be an integer", hint="e.g. lookup:4") from exc
        if not 1 <= n <= MAX_K:
            raise InputError(f"speculation {spec!r}: k must be 1 to {MAX_K}")
        return cls(kind, n)

    def __str__(self) -> str:
        extra = "" if (self.max_ngram, self.min_ngram, self.fallback) == (3, 1, None) else \
            f" (n-grams {self.min_ngram}-{self.max_ngram}, fallback {self.fallback})"
        return f"{self.kind}:{self.k}{extra}"


class _SpecState:
    """One batch size's round state at fixed addresses (CUDA graphs mutate it in place)."""

    def __init__(self, batch: int, capacity: int, device: torch.device, max_eos: int, k: int) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.seq = zeros(batch, capacity)
        self.length, self.limit = zeros(batch), zeros(batch)
        self.done = zeros(batch, dtype=torch.bool)
        self.rounds = zeros(1)
        self.stats = zeros(batch, STATS)  # per row, while running: accepted, steps, proposals verified, verify steps
        self.proposals, self.usable = zeros(batch, k), zeros(batch)  # lookup: the next round's, made by this one
        self.seeds, self.top_k = zeros(batch), zeros(batch)
        self.temperature, self.top_p = torch.ones(batch, device=device), torch.ones(batch, device=device)
        self.eos = torch.full((max_eos,), -1, dtype=torch.long, device=device)
        for t in self.args():
            torch._dynamo.mark_static_address(t)

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.seq, self.length, self.limit, self.done, self.rounds, self.stats, self.seeds, self.temperature,
                self.top_k, self.top_p, self.eos, self.proposals, self.usable)

    def progress(self, stream: bool) -> list[int]:
        """One read per round: [every row done, the longest row, the most usable lookup proposals of a running row],
        then (``stream``) every row's done flag and length."""
        head = [self.done.all().long(), self.length.max(), self.usable.max()]
        if stream:
            return torch.cat([torch.stack(head), self.done.long(), self.length]).tolist()
        return torch.stack(head).tolist()


def _draft_proposals(draft: StepModel, seq: torch.Tensor, length: torch.Tensor, k: int, mode: str, seeds, rounds,
                     temperature, top_k, top_p) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``k`` draft tokens per row, and (sampling) the draft probabilities they were drawn from."""
    last_slot = draft.max_seq_len - 1
    pos = (length.unsqueeze(1) - 2 + torch.arange(2, device=seq.device)).clamp(0, last_slot)
    tokens = seq.gather(1, (length.unsqueeze(1) - 2 + torch.arange(2, device=seq.device)).clamp(min=0))
    logits = draft.step(tokens, pos)[:, -1:].float()
    drafted, probs = [], []
    for j in range(k):
        if j:
            pos = (length.unsqueeze(1) - 1 + j).clamp(max=last_slot)
            logits = draft.step(drafted[-1].unsqueeze(1), pos).float()
        if mode == "greedy":
            drafted.append(logits[:, 0].argmax(-1))
            continue
        q = target_probs(logits, mode, temperature, top_k, top_p)[:, 0]
        drafted.append(race(q, seeds ^ SALT_DRAFT, rounds * (k + 1) + j))
        probs.append(q)
    return torch.stack(drafted, 1), (torch.stack(probs, 1) if probs else None)


def _next_lookup(spec: SpecConfig, seq: torch.Tensor, length: torch.Tensor, done: torch.Tensor,
                 proposals: torch.Tensor, usable: torch.Tensor) -> None:
    """The next round's lookup proposals into the state, made at the end of this round: the host reads how
    many are usable with the round's one read, and picks the next round's size (``Speculator._round_k``)."""
    found, count = lookup_match(seq, length, spec.k, spec.max_ngram, spec.min_ngram)
    proposals.copy_(found)
    usable.copy_(torch.where(done, 0, count))


def make_round(target: StepModel, draft: StepModel | None, spec: SpecConfig, mode: str,
               kv_len: int | None, k: int | None = None) -> Callable:
    """One round (proposals, verify, acceptance, state update) as a function of the state tensors; returns nothing.

    ``k``: the proposals this round verifies (default ``spec.k``); lookup takes the first ``k`` of the
    state's proposals. ``k = 0`` is a plain one-token step (``spec_rules.plain_token``).
    """
    k = spec.k if k is None else k
    last_slot = target.max_seq_len - 1

    def spec_round(seq, length, limit, done, rounds, stats, seeds, temperature, top_k, top_p, eos, next_props,
                   usable):
        if draft is None:
            proposals, q = next_props[:, :k], None
        else:
            proposals, q = _draft_proposals(draft, seq, length, k, mode, seeds, rounds, temperature, top_k, top_p)
        offsets = torch.arange(k + 1, device=seq.device)
        last = seq.gather(1, (length - 1).unsqueeze(1))
        pos = (length.unsqueeze(1) - 1 + offsets).clamp(max=last_slot)
        verify_in = torch.cat([last, proposals], dim=1)
        extra = {"kv_len": kv_len} if kv_len is not None else {}
        if supports_shared_rows(target):  # the verify step on the decode kernels (LlamaDecoder)
            extra["shared_rows"] = True
        logits = target.step(verify_in, pos, **extra)
        if k == 0:
            tokens = plain_token(logits, mode, temperature, top_k, top_p, seeds, rounds)
            accepted = torch.zeros_like(length)
        elif mode == "greedy":
            tokens, accepted = accept_greedy(logits, proposals)
        else:
            p = target_probs(logits, mode, temperature, top_k, top_p)
            tokens, accepted = accept_sampled(p, proposals, q, seeds, rounds)
        running = ~done
        count = torch.minimum(accepted + 1, limit - length)
        hit = _is_eos(tokens, eos) & (offsets < count.unsqueeze(1))
        first_eos = torch.where(hit, offsets, k + 1).amin(-1)
        count = torch.where(running, torch.minimum(count, first_eos + 1), 0)
        idx = (length.unsqueeze(1) + offsets).clamp(max=seq.shape[1] - 1)
        seq.scatter_(1, idx, torch.where(offsets < count.unsqueeze(1), tokens, seq.gather(1, idx)))
        length.add_(count)
        done.logical_or_(running & (hit.any(-1) | (length >= limit)))
        run = running.long()
        stats.add_(torch.stack([torch.where(running, accepted, 0), run, run * k, run * int(k > 0)], dim=1))
        rounds.add_(1)
        if draft is None:
            _next_lookup(spec, seq, length, done, next_props, usable)

    return spec_round


def _make_start(mode: str, lookup: SpecConfig | None) -> Callable:
    """The first token from the prefill logits, written after the prompt (the same draw as plain decoding);
    with ``lookup``, the first round's proposals."""

    def spec_start(logits, seq, length, limit, done, rounds, stats, seeds, temperature, top_k, top_p, eos, next_props,
                   usable):
        step = torch.zeros(1, dtype=torch.long, device=seq.device)
        first = sample(logits, mode, seeds, step, temperature, top_k, top_p)
        seq.scatter_(1, length.unsqueeze(1), first.unsqueeze(1))
        length.add_(1)
        done.copy_(_is_eos(first, eos) | (length >= limit))
        rounds.zero_()
        stats.zero_()
        if lookup is not None:
            _next_lookup(lookup, seq, length, done, next_props, usable)

    return spec_start


class Speculator:
    """Speculative generation for one ``Generator`` (its target, compile settings and prefill) and one ``SpecConfig``.

    Built by ``Generator`` for ``speculate=...``; ``draft``: the draft ``StepModel`` for ``kind="draft"``,
    prefilled by a ``Generator`` of its own with the target generator's settings.
    """

    def __init__(self, gen: Any, spec: SpecConfig, draft: StepModel | None = None) -> None:
        if spec.kind == "draft" and draft is None:
            raise InputError("speculate='draft' needs a draft model", hint="Generator(..., draft=model) or --draft PATH")
        self.gen, self.spec = gen, spec
        self.draft = draft if spec.kind == "draft" else None
        self.draft_gen = None
        if self.draft is not None:
            from graphfix.engine.draft import check_draft
            from graphfix.engine.generator import Generator

            check_draft(gen.model, self.draft)
            self.draft_gen = Generator(self.draft, compile=gen.compile, backend=gen.backend, cuda_graphs=gen.cuda_graphs,
                                       inductor_options=gen.inductor_options, graph_prefill=())
        self._states: dict[int, _SpecState] = {}
        self._fns: dict[tuple, Callable] = {}
        self._calls: dict[tuple, int] = {}

    def _state(self, batch: int) -> _SpecState:
        if batch not in self._states:
            cap = self.gen.model.max_seq_len + self.spec.k + 1
            self._states[batch] = _SpecState(batch, cap, self.gen.device, self.gen.max_eos, self.spec.k)
        return self._states[batch]

    def _fn(self, key: tuple) -> Callable:
        full = (*key, compile_key(self.gen.model), compile_key(self.draft) if self.draft is not None else None)
        fn = self._fns.get(full)
        if fn is None:
            if key[0] == "start":
                fn = self.gen._compiled(_make_start(key[2], self.spec if self.draft is None else None), False)
            else:
                fn = self.gen._compiled(make_round(self.gen.model, self.draft, self.spec, key[2], key[3], key[4]),
                                        self.gen.cuda_graphs)
            self._fns[full] = fn
        return fn

    def _check(self, batch: int, longest: int, new: int) -> None:
        draft = self.draft
        if draft is None:
            return
        if batch > draft.max_batch_size or longest + new > draft.max_seq_len:
            raise InputError(f"the draft's cache ({draft.max_batch_size} rows of {draft.max_seq_len}) is smaller than "
                             "the request", hint="allocate the draft as large as the target")

    def generate(self, rows: list[list[int]], max_new_tokens: int, sampling: SamplingParams, eos: list[int],
                 pad: int, stream: Callable[[Any], None] | None = None, stream_interval: int = 8) -> Any:
        """``Generator.generate`` for rows already checked by it; returns a ``GenerationResult``.

        ``stream``: called with a ``StreamChunk`` once every row (finished rows count as complete) has
        ``stream_interval`` tokens more than were streamed, and at the end; rounds emit a varying number
        of tokens, so chunks vary in length.
        """
        from graphfix.engine.generator import GenerationResult, _trim

        gen, batch = self.gen, len(rows)
        longest = max(len(r) for r in rows)
        self._check(batch, longest, max_new_tokens)
        mode = sampling.mode
        plain = gen._state(batch)  # prefill's own state (its per-row lengths)
        state = self._state(batch)
        wall = time.perf_counter()
        with torch.no_grad():
            gen.model.reset()
            gen._load_request(plain, sampling, eos, pad)
            self._load(state, rows, sampling, plain, max_new_tokens)
            t0 = gen._clock.mark()
            logits = gen._prefill(rows, plain)
            self._fn(("start", batch, mode))(logits, *state.args())
            del logits
            if self.draft_gen is not None:
                self.draft.reset()
                self.draft_gen._prefill(rows, self.draft_gen._state(batch))
            t1 = gen._clock.mark()
            steps, streamed = {"verify": 0, "plain": 0}, 0
            progress = state.progress(False)
            while True:
                if progress[0]:  # every row done: compiled, each round graph of this setting must have run enough
                    key = self._unwarmed(batch, mode, progress[1])
                    if key is None:
                        break
                else:
                    k = self._round_k(progress[2])
                    key = ("round", batch, mode, gen._kv_len(min(progress[1] + k, gen.model.max_seq_len)), k)
                    steps["verify" if k else "plain"] += 1
                if gen.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                self._fn(key)(*state.args())
                self._calls[key] = self._calls.get(key, 0) + 1
                progress = state.progress(stream is not None)  # one sync a round
                if stream is not None:
                    done_flags, lengths_now = progress[3:3 + batch], progress[3 + batch:]
                    ready = min(max_new_tokens if d else n - len(r) for d, n, r in zip(done_flags, lengths_now, rows))
                    if ready - streamed >= stream_interval:
                        streamed = self._emit(stream, state, rows, streamed, ready, pad, done_flags)
            t2 = gen._clock.mark()
            lengths = state.length.tolist()
            seqs = state.seq.cpu().tolist()
            stats = state.stats.sum(0).tolist()
        total = time.perf_counter() - wall
        out = [seqs[b][len(r): lengths[b]][:max_new_tokens] for b, r in enumerate(rows)]
        if stream is not None and streamed < max(len(t) for t in out):
            self._emit(stream, state, rows, streamed, max(len(t) for t in out), pad, None, out)
        tokens = [_trim(row, eos) for row in out]
        hit_eos = [bool(eos) and bool(t) and t[-1] in eos for t in tokens]
        longest_out = max(len(t) for t in out)
        accepted, active, proposed, verifying = stats
        emitted = sum(len(t) for t in out) - batch  # the first token of a row comes from the prefill
        info = {"speculate": str(self.spec), "rounds": steps["verify"] + steps["plain"],
                "verify_steps": steps["verify"], "plain_steps": steps["plain"],
                "tokens_per_step": emitted / max(1, active),
                "tokens_per_verify_step": (emitted - (active - verifying)) / max(1, verifying),
                "acceptance": accepted / max(1, proposed)}
        return GenerationResult(tokens=tokens, prompt_lengths=[len(r) for r in rows], finished=hit_eos, steps=longest_out,
                                ttft_s=gen._clock.seconds(t0, t1), decode_s=gen._clock.seconds(t1, t2), total_s=total,
                                speculation=info)

    def _round_k(self, usable: int) -> int:
        """How many proposals the next round verifies, from the most usable lookup proposals of a running row.

        A draft always proposes ``k``. Lookup with the fallback on: none when no running row matched (a plain
        one-token step); eager, exactly the usable count (a smaller step costs less, and eager has no graphs to
        multiply); compiled, ``k`` or none (one round graph per setting, plus the plain one).
        """
        spec = self.spec
        fallback = spec.fallback if spec.fallback is not None else not self.gen.cuda_graphs
        if self.draft is not None or not fallback:
            return spec.k
        if not self.gen.compile:
            return min(spec.k, usable)
        return spec.k if usable > 0 else 0

    def _unwarmed(self, batch: int, mode: str, longest: int) -> tuple | None:
        """After every row is done, a round graph of this request's setting that has not run often enough yet.

        Compiled, both graphs a request may use (verify and, with the fallback, plain) are run here once every
        row is done (finished rows are masked: no token changes), so that a warm-up request compiles both, and,
        with CUDA graphs, each reaches its recorded replay (``GRAPH_CALLS``). Eager: nothing to warm.
        """
        if not self.gen.compile:
            return None
        sizes = {self._round_k(0), self._round_k(self.spec.k)}
        needed = GRAPH_CALLS if self.gen.cuda_graphs else 1
        for k in sorted(sizes, reverse=True):
            key = ("round", batch, mode, self.gen._kv_len(min(longest + k, self.gen.model.max_seq_len)), k)
            if self._calls.get(key, 0) < needed:
                return key
        return None

    @staticmethod
    def _emit(stream: Callable[[Any], None], state: _SpecState, rows: list[list[int]], start: int, end: int, pad: int,
              done: list[int] | None, out: list[list[int]] | None = None) -> int:
        """Tokens ``start .. end - 1`` of every row as a ``StreamChunk`` (pad after a finished row's last token)."""
        from graphfix.engine.generator import StreamChunk

        if out is None:
            lengths = state.length.tolist()
            seqs = state.seq.cpu().tolist()
            out = [seqs[b][len(r): lengths[b]] for b, r in enumerate(rows)]
        chunk = [(row + [pad] * (end - len(row)))[start:end] if len(row) < end else row[start:end] for row in out]
        finished = [bool(d) for d in done] if done is not None else state.done.cpu().tolist()
        stream(StreamChunk(tokens=torch.tensor(chunk, dtype=torch.long), start=start, finished=finished))
        return end

    def _load(self, state: _SpecState, rows: list[list[int]], sampling: SamplingParams, plain: Any, new: int) -> None:
        seq = torch.zeros(state.seq.shape, dtype=torch.long)
        for b, r in enumerate(rows):
            seq[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        state.seq.copy_(seq)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        state.length.copy_(lengths)
        state.limit.copy_(lengths + new)
        state.done.zero_()
        for mine, theirs in ((state.seeds, plain.seeds), (state.temperature, plain.temperature),
                             (state.top_k, plain.top_k), (state.top_p, plain.top_p), (state.eos, plain.eos)):
            mine.copy_(theirs)


def speculators(gen: Any, spec: str | SpecConfig | None, draft: StepModel | None,
                cache: dict[str, Speculator]) -> Speculator | None:
    """The ``Speculator`` for ``spec`` on ``gen`` (kept in ``cache`` per spec), or ``None`` when speculation is off."""
    config = SpecConfig.parse(spec)
    if config is None:
        return None
    name = str(config)
    if name not in cache:
        cache[name] = Speculator(gen, config, draft)
    return cache[name]


__all__: Sequence[str] = ["KINDS", "SpecConfig", "Speculator", "make_round", "speculators"]
