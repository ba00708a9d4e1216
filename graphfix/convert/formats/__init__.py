"""Readers and writers, one module per on-disk format; ``open_checkpoint`` picks the reader."""
