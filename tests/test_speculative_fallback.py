"""Prompt lookup's no-match fallback (graphfix.engine.speculative): a round where no running row has an n-gram
match runs a plain one-token step; eager rounds verify only the usable proposals. Output unchanged.

Tiny random-weight decoders on CPU, as in tests/test_speculative.py; the sampling check reuses the position-only
table models and chi-square threshold of tests/test_speculative_sampling.py.
"""

from __future__ import annotations

import torch

from graphfix.bench.presets import tiny_hf_model
from graphfix.engine import Generator, SamplingParams, from_hf
from graphfix.engine.spec_rules import lookup_match
from graphfix.engine.speculative import SpecConfig
from tests.test_speculative_sampling import CRITICAL, ROWS, TARGET, VOCAB, TableModel, _chi2

FRESH = [1, 2, 3]  # "3" never came before: the first round has nothing to propose
NEW = 16


class SuccessorModel:
    """A ``StepModel`` whose greedy next token is ``(token + 1) % vocab``: its output counts up, so it matches a
    prompt exactly where the prompt counts up too, and nowhere else."""

    per_row_positions = True

    def __init__(self, vocab: int = 48, rows: int = 2, seq: int = 64) -> None:
        self.max_batch_size, self.max_seq_len = rows, seq
        self.config = type("Config", (), {"vocab_size": vocab})()

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((tokens + 1) % self.config.vocab_size, self.config.vocab_size).float()

    def reset(self) -> None:
        pass


def _decoder():
    return from_hf(tiny_hf_model("llama", "cpu", num_hidden_layers=2), max_batch_size=2, max_seq_len=64)


def test_lookup_match_counts_the_rows_own_tokens():
    seq = torch.tensor([[1, 2, 3, 4, 1, 2, 0, 0, 0, 0],    # "1 2" followed by "3 4 1 2": 4 tokens of the row
                        [1, 2, 9, 1, 2, 0, 0, 0, 0, 0],    # "1 2" followed by "9 1": both the row's, then "2" is the tail
                        [4, 4, 8, 0, 0, 0, 0, 0, 0, 0],    # no earlier "8": nothing usable
                        [3, 7, 5, 7, 0, 0, 0, 0, 0, 0]])   # only a 1-gram ("7" followed by "5 7")
    length = torch.tensor([6, 5, 3, 4])
    props, usable = lookup_match(seq, length, k=3)
    assert props.tolist() == [[3, 4, 1], [9, 1, 2], [8, 0, 0], [5, 7, 0]]
    assert usable.tolist() == [3, 3, 0, 2]  # row 3: "5 7" are its tokens, the slot after its length is not
    _, usable = lookup_match(seq, length, k=3, min_ngram=2)
    assert usable.tolist() == [3, 3, 0, 0]  # a 1-gram match no longer counts


def test_greedy_equals_plain_with_the_fallback_taken():
    dec = _decoder()
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 9, 10], FRESH]
    plain = Generator(dec, compile=False).generate(prompts, NEW)
    for rows in (prompts, [FRESH]):
        ref = [plain.tokens[prompts.index(p)] for p in rows]
        on = Generator(dec, compile=False, speculate="lookup:3").generate(rows, NEW)
        off = Generator(dec, compile=False, speculate=SpecConfig("lookup", 3, fallback=False)).generate(rows, NEW)
        assert on.tokens == ref and off.tokens == ref, rows
        info, base = on.speculation, off.speculation
        assert info["rounds"] == info["verify_steps"] + info["plain_steps"] and base["plain_steps"] == 0
        assert info["plain_steps"] >= 1  # FRESH's first round matched nothing (nor did the other row's)
        assert info["acceptance"] >= base["acceptance"]  # the same accepted proposals, fewer (padding) verified


def test_plain_and_verify_steps_where_the_output_quotes_the_prompt():
    """The output 8, 9, 10, ... quotes the prompt 10 .. 20: nothing matches 8 or 9 (two plain steps), then three
    verify steps (11-14, 15-18, 19-21: the prompt goes on with 7), then 21 and 22 match nothing (two plain steps).
    A row that never matches (FRESH) rides along in the other row's verify steps, one token each."""
    model = SuccessorModel()
    quoting = list(range(10, 21)) + [7]
    plain = Generator(model, compile=False).generate([quoting, FRESH], NEW)
    assert plain.tokens[0] == list(range(8, 8 + NEW))
    alone = Generator(model, compile=False, speculate="lookup:3").generate([quoting], NEW)
    assert alone.tokens == plain.tokens[:1]
    assert (alone.speculation["plain_steps"], alone.speculation["verify_steps"]) == (4, 3)
    both = Generator(model, compile=False, speculate="lookup:3").generate([quoting, FRESH], NEW)
    assert both.tokens == plain.tokens
    assert (both.speculation["plain_steps"], both.speculation["verify_steps"]) == (NEW - 1 - 3, 3)
    fresh = Generator(model, compile=False, speculate="lookup:3").generate([FRESH], NEW)
    assert fresh.tokens == plain.tokens[1:] and fresh.speculation["verify_steps"] == 0  # counts up: never a match
    assert fresh.speculation["plain_steps"] == NEW - 1


def test_min_ngram_sends_weak_matches_to_plain_steps():
    dec = _decoder()
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 9, 10], FRESH]
    plain = Generator(dec, compile=False).generate(prompts, NEW)
    out = Generator(dec, compile=False, speculate=SpecConfig("lookup", 2, min_ngram=3)).generate(prompts, NEW)
    loose = Generator(dec, compile=False, speculate="lookup:2").generate(prompts, NEW)
    assert out.tokens == plain.tokens == loose.tokens
    assert out.speculation["plain_steps"] > loose.speculation["plain_steps"]


def test_round_sizes_per_mode():
    """Eager: the usable count (no graphs to multiply); compiled: k or a plain step; fallback off: always k."""
    dec = _decoder()
    sizes = {}
    for name, gen in {"eager": Generator(dec, compile=False, speculate="lookup:4"),
                      "compiled": Generator(dec, backend="eager", speculate="lookup:4"),
                      "off": Generator(dec, compile=False, speculate=SpecConfig("lookup", 4, fallback=False))}.items():
        spec = next(iter(gen._speculators.values()))
        sizes[name] = [spec._round_k(u) for u in range(5)]
    assert sizes == {"eager": [0, 1, 2, 3, 4], "compiled": [0, 4, 4, 4, 4], "off": [4] * 5}


def test_compiled_fallback_warms_up_both_round_graphs():
    """A compiled generator compiles the plain round graph on its first request even when every round matched,
    so that after warmup a request that needs the fallback compiles nothing."""
    dec = _decoder()
    prompts = [FRESH, [5, 6, 7, 8, 5, 6, 7, 8, 9, 10]]
    plain = Generator(dec, compile=False).generate(prompts, NEW)
    gen = Generator(dec, backend="eager", speculate="lookup:3")
    gen.warmup(batch_sizes=(2,), prompt_lengths=[12])  # prompts of zeros: every round matches
    assert gen.graphs().get("spec_round") == 2
    with torch.compiler.set_stance("fail_on_recompile"):
        out = gen.generate(prompts, NEW)
    assert out.tokens == plain.tokens and gen.recompiles() == 0


def test_sampling_with_plain_steps_follows_the_target_distribution():
    """Lookup that only counts 2-gram matches: many rounds are plain steps, the rest verify; every position's
    tokens are still the target's draws (the chi-square test of tests/test_speculative_sampling.py)."""
    model = TableModel(TARGET, ROWS)
    gen = Generator(model, compile=False, speculate=SpecConfig("lookup", 3, min_ngram=2))
    out = gen.generate([[0]] * ROWS, 6, sampling=SamplingParams(temperature=1.0, seed=11))
    info = out.speculation
    assert info["plain_steps"] > 0 and info["verify_steps"] > 0
    tokens = torch.tensor(out.tokens)
    assert tokens.shape == (ROWS, 6) and int(tokens.max()) < VOCAB
    for j in range(6):
        assert _chi2(tokens[:, j], TARGET[j]) < CRITICAL, j
