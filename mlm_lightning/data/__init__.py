"""The data path: corpus -> tokenizer -> shards -> cache -> masking -> sampling -> `MLMDataModule`.

It never imports the model, the CLI or the server.
"""

__all__ = ["MLMDataModule", "MLMDataset"]


def __getattr__(name: str):
    # lazy: the light modules here (tokenizer, corpus) serve fill-mask and the server without Lightning's import
    if name in __all__:
        from mlm_lightning.data import module

        return getattr(module, name)
    raise AttributeError(f"module 'mlm_lightning.data' has no attribute {name!r}")
