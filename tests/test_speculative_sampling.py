"""Speculative sampling keeps the target's distribution (graphfix.engine.speculative, spec_rules.accept_sampled).

The models here are tables: the logits at position ``p`` are ``table[p]`` whatever the tokens,
so under the correct rule the token at every position is an independent draw from the
target's table. Thousands of rows (each its own seed) give the empirical distribution per
position, compared with a chi-square test at a fixed threshold. The draws are counter-based
(deterministic), so the test never flakes; it has power: the draft's own distribution, or a rule
that accepts every draft token, is far beyond the threshold (checked too).
"""

from __future__ import annotations

import pytest
import torch

from graphfix.engine import Generator, SamplingParams
from graphfix.engine.spec_rules import accept_sampled

VOCAB, NEW, ROWS = 4, 6, 3000
CRITICAL = 16.27  # chi-square, 3 degrees of freedom, p = 0.001
CRITICAL_BY_DF = {1: 10.83, 2: 13.82, 3: CRITICAL}


class TableModel:
    """A ``StepModel`` whose logits depend on the position only: ``log(table[input_pos])``."""

    per_row_positions = True

    def __init__(self, table: torch.Tensor, rows: int) -> None:
        self.logits = table.log()
        self.max_batch_size, self.max_seq_len = rows, table.shape[0]
        self.config = type("Config", (), {"vocab_size": table.shape[1]})()

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.logits[input_pos]

    def reset(self) -> None:
        pass


def _table(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(64, VOCAB, generator=g) + 0.05
    return t / t.sum(-1, keepdim=True)


TARGET, DRAFT = _table(1), _table(2)


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic scaled to 3 degrees of freedom's threshold; infinite for a token of probability 0."""
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    expected = probs.double() * tokens.numel()
    possible = expected > 0
    if counts[~possible].sum() > 0:
        return float("inf")
    stat = float(((counts - expected)[possible] ** 2 / expected[possible]).sum())
    return stat * CRITICAL / CRITICAL_BY_DF[int(possible.sum()) - 1]


def _generate(speculate: str, top_k: int | None = None) -> torch.Tensor:
    target, draft = TableModel(TARGET, ROWS), TableModel(DRAFT, ROWS)
    gen = Generator(target, compile=False, speculate=speculate, draft=draft)
    out = gen.generate([[0]] * ROWS, NEW, sampling=SamplingParams(temperature=1.0, top_k=top_k, seed=7))
    assert all(len(t) == NEW for t in out.tokens)
    if speculate.startswith("draft"):  # the rule ran: some proposals accepted, some not
        assert 0.2 < out.speculation["acceptance"] < 0.95
    return torch.tensor(out.tokens)


def _top2(probs: torch.Tensor) -> torch.Tensor:
    kept = torch.zeros_like(probs).scatter(-1, probs.topk(2).indices, 1.0) * probs
    return kept / kept.sum(-1, keepdim=True)


@pytest.mark.parametrize("speculate", ["draft:3", "lookup:3"])
def test_tokens_follow_the_target_distribution(speculate):
    tokens = _generate(speculate)
    for j in range(NEW):  # the token at sequence position j + 1 comes from the logits at position j
        assert _chi2(tokens[:, j], TARGET[j]) < CRITICAL, (speculate, j)


def test_filtered_sampling_follows_the_filtered_target():
    tokens = _generate("draft:2", top_k=2)
    for j in range(NEW):
        assert _chi2(tokens[:, j], _top2(TARGET[j])) < CRITICAL, j


def test_the_test_has_power():
    """The draft's distribution, and always accepting the draft, are both rejected by the same threshold."""
    for j in range(1, NEW):
        expected_gap = ROWS * float(((DRAFT[j] - TARGET[j]) ** 2 / TARGET[j]).sum())
        assert expected_gap > 5 * CRITICAL, j
    # the rule itself: with q = the draft's probabilities, accepted tokens are not simply the draft's
    k, rows = 2, 20000
    q = DRAFT[1:1 + k].expand(rows, k, VOCAB)
    p = TARGET[1:2 + k].expand(rows, k + 1, VOCAB)
    g = torch.Generator().manual_seed(3)
    drafted = torch.multinomial(q.reshape(-1, VOCAB), 1, generator=g).view(rows, k)
    tokens, accepted = accept_sampled(p, drafted, q, torch.arange(rows), torch.zeros(1, dtype=torch.long))
    assert _chi2(tokens[:, 0], TARGET[1]) < CRITICAL
    assert _chi2(drafted[:, 0], TARGET[1]) > 10 * CRITICAL  # what "accept everything" would emit
    second = tokens[accepted >= 1, 1]  # given the first was accepted, the second is again a target draw
    assert _chi2(second, TARGET[2]) < CRITICAL
