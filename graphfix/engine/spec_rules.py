"""Speculative decoding's tensor rules: prompt-lookup proposals and the accept rules, on the device.

Everything here is fixed-shape tensor arithmetic with no host sync, so it traces into
the round graph of ``graphfix.engine.speculative`` (one compiled, CUDA-graphed call per round):

- ``lookup_match`` / ``lookup_proposals``: prompt lookup (n-gram) decoding. Each row's last ``m``
  tokens (``m`` from ``max_ngram`` down to ``min_ngram``) are searched for in the row's earlier
  tokens; the ``k`` tokens that followed the most recent match are the proposal, with the count
  of them that are the row's own tokens (0: no match). Always ``k`` tokens (padded with whatever
  follows, or the last token when nothing matched): a bad proposal only costs acceptance, never
  exactness, because the target verifies every token.
- ``plain_token``: the target's next token when a round proposes nothing (a plain one-token step).
- ``accept_greedy``: the longest prefix of the proposal equal to the target's argmax;
  the target's next argmax follows it. The emitted tokens are exactly the target's greedy tokens.
- ``accept_sampled``: the standard speculative-sampling rule (accept draft token ``d`` with
  probability ``min(1, p(d) / q(d))``; at the first rejection draw from ``max(p - q, 0)``
  renormalized; after ``k`` acceptances draw the bonus token from ``p``). The emitted
  tokens are distributed as the target's own samples. A proposal from lookup is a
  draft with ``q`` one-hot at the proposed token.

Randomness comes from ``sampling.uniform_noise`` (a counter-based hash of seed, counter and
index), with a salt per use, so draws are fresh per round and identical eager or compiled.
"""

from __future__ import annotations

import torch

from graphfix.engine.sampling import filter_logits, uniform_noise

SALT_DRAFT = 0x5EC0D1
SALT_ACCEPT = 0xACCE97
SALT_RESIDUAL = 0x2E51D0


def lookup_match(seq: torch.Tensor, length: torch.Tensor, k: int, max_ngram: int = 3,
                 min_ngram: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(proposals (B, k), usable (B,))``: prompt-lookup proposals and how many of them are real tokens.

    Each row's last ``m`` tokens (``m`` from ``max_ngram`` down to ``min_ngram``) are searched for in
    ``seq[b, :length[b]]`` (prompt and generated). Longer n-grams win over shorter ones; among matches
    of one size, the most recent wins (generation tends to repeat what it just quoted). A match must
    end before the row's last token, so the continuation starts at a real token.

    ``usable[b]``: the proposal tokens that come from the row itself (``min(k, length - start)``);
    0 when no n-gram of at least ``min_ngram`` tokens matched. Proposals past ``usable`` read slots at
    or above the row's length, which hold nothing the row wrote: a round needs to verify only the
    first ``usable``, and a round where no row has any is better run as a plain one-token step
    (``speculative.Speculator`` decides per round from this count).
    """
    bsz, cap = seq.shape
    start = length - 1  # nothing matched: propose from the last token on (rarely accepted, always correct)
    found = torch.zeros(bsz, dtype=torch.bool, device=seq.device)
    for m in range(max_ngram, max(1, min_ngram) - 1, -1):
        tail_idx = (length.unsqueeze(1) - m + torch.arange(m, device=seq.device)).clamp(min=0)
        tail = seq.gather(1, tail_idx)  # (B, m)
        windows = seq.unfold(1, m, 1)  # (B, cap - m + 1, m)
        match = (windows == tail.unsqueeze(1)).all(-1)
        j = torch.arange(windows.shape[1], device=seq.device)
        valid = match & (j + m < length.unsqueeze(1))  # strictly before the tail itself
        best = torch.where(valid, j, -1).amax(-1)
        hit = (best >= 0) & ~found
        start = torch.where(hit, best + m, start)
        found = found | hit
    idx = (start.unsqueeze(1) + torch.arange(k, device=seq.device)).clamp(max=cap - 1)
    usable = torch.where(found, (length - start).clamp(max=k), 0)
    return seq.gather(1, idx), usable


def lookup_proposals(seq: torch.Tensor, length: torch.Tensor, k: int, max_ngram: int = 3) -> torch.Tensor:
    """``(B, k)`` proposals from each row's own tokens ``seq[b, :length[b]]`` (``lookup_match`` without the count)."""
    return lookup_match(seq, length, k, max_ngram)[0]


def plain_token(logits: torch.Tensor, mode: str, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """``(B, 1)``: the target's own next token from a one-token step's logits ``(B, 1, V)`` (a round with no proposal).

    Greedy: the argmax. Sampling: one draw from the target's probabilities, with the residual
    draw's salt and the round counter (what ``accept_sampled`` draws after a rejection, with ``q = 0``),
    so the token follows the target's distribution and every round's numbers are fresh.
    """
    if mode == "greedy":
        return logits.argmax(-1)
    p = target_probs(logits, mode, temperature, top_k, top_p)[:, 0]
    return race(p, seeds ^ SALT_RESIDUAL, counter).unsqueeze(1)


def accept_greedy(logits: torch.Tensor, proposals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (B, k+1), accepted (B,))``: the target's argmax at every position and how many proposals matched.

    Row ``b`` emits ``tokens[b, :accepted[b] + 1]``: the accepted proposals equal the target's
    argmax there, and the last is the target's own next token.
    """
    target = logits.argmax(-1)
    k = proposals.shape[1]
    accepted = (proposals == target[:, :k]).long().cumprod(-1).sum(-1)
    return target, accepted


def target_probs(logits: torch.Tensor, mode: str, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities ``(B, T, V)`` that ``sampling.sample`` draws from, for every position of ``logits``."""
    bsz, steps, vocab = logits.shape
    scaled = logits.float() / temperature.view(-1, 1, 1)
    if mode == "filtered":
        rep = lambda t: t.repeat_interleave(steps)  # per-row settings for every position
        scaled = filter_logits(scaled.reshape(bsz * steps, vocab), rep(top_k), rep(top_p)).view(bsz, steps, vocab)
    return torch.softmax(scaled, dim=-1)


def race(weights: torch.Tensor, seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A draw ``(B,)`` proportional to the non-negative ``weights`` ``(B, V)`` (unnormalized): ``argmax(w / Exp(1))``."""
    q = -torch.log(uniform_noise(seeds, counter, weights.shape[-1]))
    return torch.argmax(weights / q, dim=-1)


def accept_sampled(p: torch.Tensor, proposals: torch.Tensor, q: torch.Tensor | None, seeds: torch.Tensor,
                   counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (B, k+1), accepted (B,))`` by the speculative-sampling rule.

    ``p``: target probabilities ``(B, k+1, V)``; ``q``: the draft's ``(B, k, V)`` that drew
    ``proposals``, or ``None`` for deterministic proposals (lookup: ``q`` one-hot). Row ``b``
    emits ``tokens[b, :accepted[b] + 1]``.
    """
    k = proposals.shape[1]
    p_d = p[:, :k].gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
    if q is None:
        q = torch.zeros_like(p[:, :k]).scatter_(-1, proposals.unsqueeze(-1), 1.0)
    q_d = q.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
    u = uniform_noise(seeds ^ SALT_ACCEPT, counter, k)  # (B, k)
    ok = u * q_d <= p_d  # u < p/q without dividing by a zero q
    accepted = ok.long().cumprod(-1).sum(-1)
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # after k acceptances: the bonus draw from p
    residual = (p - q_ext).clamp(min=0)
    at = accepted.view(-1, 1, 1).expand(-1, 1, p.shape[-1])
    res, p_at = residual.gather(1, at).squeeze(1), p.gather(1, at).squeeze(1)
    res = torch.where(res.sum(-1, keepdim=True) > 0, res, p_at)  # p == q there: rejection has probability 0
    fresh = race(res, seeds ^ SALT_RESIDUAL, counter)
    tokens = torch.cat([proposals, proposals[:, :1]], dim=1).scatter(1, accepted.unsqueeze(1), fresh.unsqueeze(1))
    return tokens, accepted
