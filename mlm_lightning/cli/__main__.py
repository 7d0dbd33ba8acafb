"""`python -m mlm_lightning.cli ...` = `mlm-lightning ...` (what torchrun and the tests launch)."""

from mlm_lightning.cli.main import main

main()
