"""Rewriting: the pass interface and registry (``pass_manager``) and the compile-clean building blocks
(``blocks``) that the passes in the top-level ``passes`` package swap in."""
