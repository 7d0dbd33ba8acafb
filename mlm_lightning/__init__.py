"""Train and use BERT masked-language models on your own text, on PyTorch Lightning.

`mlm_lightning.data.MLMDataModule` and `mlm_lightning.model.MLMModule` are the Lightning pieces;
`mlm-lightning` (`mlm_lightning.cli:main`) is the command line.
"""

__version__ = "0.1.0"
