"""PairedComplex: each operation equals torch's on complex tensors, eager and traced by Dynamo; storing tables."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphfix.rewrite.blocks import paired_complex as pc

GEN = torch.Generator().manual_seed(0)
X = torch.randn(2, 5, 3, 8, generator=GEN)
ANGLES = torch.randn(5, 4, generator=GEN)
REAL = torch.randn(5, 1, 4, generator=GEN)


def _ops(vac, var, polar, cpx, mul, add, sub, div, neg):
    """The same computations on torch's complex tensors or on the stand-in, written once."""
    z = vac(X.reshape(2, 5, 3, 4, 2))
    table = polar(torch.ones_like(ANGLES), ANGLES)
    wide = table.view(1, 5, 1, 4)
    halves = cpx(X[..., :4], X[..., 4:])
    return {
        "product": var(mul(z, wide)).flatten(3),
        "product_reversed": var(mul(wide, z)),
        "by_real_tensor": var(mul(table[None, :, None, :].expand(2, 5, 3, 4), REAL)),
        "real_tensor_by": var(mul(REAL, table)),
        "by_python_complex": var(mul(z[..., 1:3], 1j)),
        "add_sub_neg": var(sub(add(z, wide), neg(mul(z, 2.0)))),
        "add_real": var(add(z, REAL[None])),
        "divide": var(div(z, 3.0)),
        "conj": var(mul(z, wide.conj()).clone()),
        "views": var(z[:, 2:4].unsqueeze(-1).squeeze(-1).transpose(1, 2).contiguous()),
        "permute_reshape": var(z.permute(0, 2, 1, 3).reshape(6, 5, 4)),
        "flatten": var(z.flatten(1, 2)),
        "index_ellipsis_none": var(z[..., None, 1:]),
        "index_tensor": var(table[torch.tensor([4, 0, 2])]),
        "halves": torch.cat([mul(halves, table[:, None, :]).real, mul(halves, table[:, None, :]).imag], -1),
        "type_as_real": mul(z, wide).type_as(X),
        "to_complex128": var(z.to(torch.complex128)),
        "sizes": torch.tensor([z.ndim, z.dim(), z.size(-1), z.shape[1], z.numel(), len(z), z.is_complex()]),
    }


def _torch_ops():
    def div(a, b):
        return a / b

    def neg(a):
        return -a

    return _ops(torch.view_as_complex, torch.view_as_real, torch.polar, torch.complex, torch.mul, torch.add,
                torch.sub, div, neg)


def _paired_ops():
    return _ops(pc.view_as_complex, pc.view_as_real, pc.polar, pc.complex, pc.mul, pc.add, pc.sub, pc.truediv,
                pc.neg)


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_each_operation_equals_torch_complex_eager_and_traced():
    expected = _torch_ops()
    traced = torch.compile(_paired_ops, fullgraph=True, backend="aot_eager")
    for outputs in (_paired_ops(), traced()):
        assert outputs.keys() == expected.keys()
        for name, value in outputs.items():
            assert value.shape == expected[name].shape and value.dtype == expected[name].dtype, name
            assert (value - expected[name]).abs().max() <= 1e-6, name


def test_to_a_real_dtype_keeps_the_real_part_like_torch():
    z = pc.view_as_complex(torch.randn(3, 2))
    assert torch.equal(z.to(torch.float64), z.real.double())
    assert isinstance(z.to("cpu"), pc.PairedComplex) and z.to(torch.complex128).pair.dtype == torch.float64
    assert z.dtype == torch.complex64 and z.to(torch.complex128).dtype == torch.complex128


def test_a_complex_tensor_from_unrewritten_code_still_multiplies():
    z = torch.polar(torch.ones(4), torch.randn(4, generator=GEN))
    w = torch.view_as_complex(torch.randn(4, 2, generator=GEN))
    assert torch.allclose(pc.view_as_real(pc.mul(pc.PairedComplex(torch.view_as_real(w)), z)),
                          torch.view_as_real(w * z), atol=1e-6)
    assert torch.equal(pc.stored(z).pair, torch.view_as_real(z)) and pc.stored(None) is None
    assert torch.equal(pc.storable(z), torch.view_as_real(z))


def test_store_as_pairs_shares_one_pair_per_table_and_leaves_other_tensors():
    table = torch.polar(torch.ones(8, 2), torch.randn(8, 2, generator=GEN))
    first, second = nn.Module(), nn.Module()
    first.register_buffer("freqs", table, persistent=False)
    second.freqs = table
    shared: dict = {}
    assert "non-persistent buffer freqs" in pc.store_as_pairs(first, "freqs", shared)
    assert "attribute freqs" in pc.store_as_pairs(second, "freqs", shared)
    assert first.freqs is second.freqs and first.freqs.data_ptr() == table.data_ptr()  # a view, not a copy
    assert "freqs" not in first.state_dict() and pc.paired_names(first) == {"freqs"}
    with pytest.raises(TypeError):
        pc.store_as_pairs(first, "freqs")  # already real


class _SlicedByPosition(nn.Module):
    """A table sliced at an int attribute that moves each call, as research code keeps its position."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(64, 4, 2, generator=GEN))
        self.pos = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = pc.stored(self.table)[self.pos : self.pos + x.shape[0]]
        self.pos += x.shape[0]
        return pc.view_as_real(pc.mul(pc.view_as_complex(x), rows))


def test_indexing_with_a_dynamic_position_does_not_recompile():
    # an identity test on an index (`i is Ellipsis`) made Dynamo specialise the slice bound: one graph per position
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        model = _SlicedByPosition()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        compiled(torch.randn(5, 4, 2, generator=GEN))
        for _ in range(2):
            compiled(torch.randn(1, 4, 2, generator=GEN))
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(3):
                out = compiled(torch.randn(1, 4, 2, generator=GEN))
    assert model.pos == 10 and out.shape == (1, 4, 2)
