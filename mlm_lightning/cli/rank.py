"""This process's rank from the launcher's environment, before any process group exists."""

from __future__ import annotations

import os

# Lightning's order (`lightning.fabric.utilities.rank_zero._get_rank`, what `rank_zero_only` uses): the global
# rank first; SLURM_PROCID may be set without SLURM launching the processes, so it comes after LOCAL_RANK
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> int:
    """0 for a single process (and for a value that is not a number: the one process that prints)."""
    for key in RANK_VARIABLES:
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
