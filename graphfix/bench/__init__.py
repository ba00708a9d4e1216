"""Benchmarks and GPU self-checks of the engine: beside it, not inside it (``graphfix bench`` runs ``decode``)."""
