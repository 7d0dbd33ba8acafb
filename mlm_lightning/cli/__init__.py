"""The command line: `main` (dispatch, logging, exit codes, the one error mapping), `lightning` (LightningCLI's
fit/validate/test/predict), `commands` (fill-mask, export, plot), `defaults` (defaults that follow the options)."""

from mlm_lightning.cli.main import main

__all__ = ["main"]
