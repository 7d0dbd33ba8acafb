"""Train and use BERT-family masked-language models on your own text, on PyTorch Lightning.

`MLMDataModule` (`mlm_lightning.data`) and `MLMModule` (`mlm_lightning.model`) are the Lightning pieces;
`mlm-lightning` (`mlm_lightning.cli.main:main`) is the command line. README "Layout" maps the folders.
"""

__version__ = "0.1.0"
__all__ = ["MLMDataModule", "MLMModule"]


def __getattr__(name: str):
    # lazy: `import mlm_lightning` (every command, `--help` included) must not pay for Lightning and torch
    if name == "MLMModule":
        from mlm_lightning.model import MLMModule

        return MLMModule
    if name == "MLMDataModule":
        from mlm_lightning.data import MLMDataModule

        return MLMDataModule
    raise AttributeError(f"module 'mlm_lightning' has no attribute {name!r}")
