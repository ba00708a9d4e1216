"""graphfix's built-in passes, registered in the ``graphfix.passes`` entry-point group.

One module per job: ``collectives`` (functional-collectives), ``rope`` (real-rope, with ``_complex_flow``),
``sdpa`` (sdpa-attention, sdpa-context), ``kv_cache`` (static-kv-cache),
``inference_mode`` (inference-mode), ``side_effects`` (side-effects, with ``_eager_only``,
``_scalar_checks`` and ``_purity``). docs/passes.md
describes each, and the compile-clean building blocks they swap in live in
``graphfix.rewrite.blocks``.
"""
