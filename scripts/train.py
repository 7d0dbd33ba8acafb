"""Same as the `mlm-lightning` command: `python scripts/train.py fit --config configs/default.yaml`."""

from mlm_lightning.cli import main

if __name__ == "__main__":
    main()
