"""The graceful stop's state, shared by the fit's callback (`stopping.GracefulStop`, which sets it) and the
command line (which reads it): a module that imports nothing, so the CLI's signal handler and error lines need
neither torch nor Lightning."""

from __future__ import annotations

# a fit with GracefulStop's handlers is under way: the CLI's own handler stands aside
running = False
# the signal that stopped the last fit (None: none)
last_signum: int | None = None
