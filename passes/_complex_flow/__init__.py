"""Where complex values flow in a model's code, and whether the paired stand-in covers every place they reach.

The ``real-rope`` pass replaces the calls that make complex tensors (``torch.view_as_complex``,
``torch.polar``, ``torch.complex``) by ones that return a ``PairedComplex``
(``graphfix.rewrite.blocks.paired_complex``). That is correct only if every place such a value
reaches is something the stand-in supports: a partial rewrite would hand a Python object to
code that expects a tensor, or read a converted table as if it were still complex.

So this package follows complex values in the source, from where they are made, through local
names, helper calls (any depth), submodule calls (``self.attn(...)``, ``for layer in self.layers:
layer(...)``), ``*args`` forwarding, returns and module attributes, and checks each use against
the stand-in's surface (``surface``). Values are abstract (``values``): ``c``, a complex value
the rewrite pairs, and ``u``, a value from outside the analysed code (an argument of the root's
methods, a property, an unknown call) that may be complex. Code that complex values connect
forms a group; a group with one unsupported use (an op the stand-in lacks, a value from outside,
a store the pass cannot follow) is left entirely as it is, and each such use is reported.

Modules: ``values`` (the abstract values), ``surface`` (what the stand-in supports), ``objects``
(what a module attribute is, without running user code), ``interpreter`` and ``calls`` (one
function's body), ``analysis`` (the whole model: contexts, fixpoint, groups), ``plan`` (the
result and the source edits it makes).
"""

from passes._complex_flow.analysis import analyse
from passes._complex_flow.plan import Plan

__all__ = ["Plan", "analyse"]
