"""`python -m flashep.bench`: flashep's benchmark.

Spawns local ranks, checks every op against `flashep.reference`, times dispatch and combine in both
modes (kernel time and end-to-end), and compares with NCCL `all_to_all_single` moving the same bytes
and with DeepEP's figures measured on the same kind of GPU. `python -m flashep.bench --help` lists the
options; docs/perf.md defines the metrics.
"""
from .cli import main

__all__ = ["main"]
