"""Tiny Meta reference ``Transformer``s (llama_models on fairscale) for diagnosis tests."""

from __future__ import annotations

import torch
from torch import nn

from graphfix.diagnose.meta_loader import ensure_model_parallel

TINY_ARGS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 16,
             "use_scaled_rope": True, "rope_theta": 500000.0, "norm_eps": 1e-5}


def tiny_meta_transformer(seed: int = 0, max_seq_len: int = 64) -> nn.Module:
    """Meta's Transformer at the current model-parallel size with seeded random weights."""
    ensure_model_parallel()
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(max_seq_len=max_seq_len, max_batch_size=1, **TINY_ARGS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def strip_fairscale(model: nn.Module) -> nn.Module:
    """Swap fairscale's parallel layers for plain ones (world size 1), sharing the weights.

    This stands in for the collectives pass so the diagnosis can be shown what
    hides behind the fairscale breaks: the inference-mode failure.
    """
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    for name, child in list(model.named_children()):
        if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
            plain = nn.Linear(child.in_features, child.out_features, bias=False)
            plain.weight = child.weight
            setattr(model, name, plain)
        elif isinstance(child, VocabParallelEmbedding):
            plain = nn.Embedding(child.num_embeddings, child.embedding_dim)
            plain.weight = child.weight
            setattr(model, name, plain)
        else:
            strip_fairscale(child)
    return model
