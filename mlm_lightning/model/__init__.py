"""The model: `arch` (the only code that knows a model family's internals), `MLMModule` (`module`), the checkpoint
payload and model loading (`checkpoint`), sharded checkpoint directories (`sharded`), fill-mask (`fill_mask`)."""

__all__ = ["MLMModule"]


def __getattr__(name: str):
    # lazy: fill-mask and the server load models through `checkpoint` without Lightning's import
    if name == "MLMModule":
        from mlm_lightning.model.module import MLMModule

        return MLMModule
    raise AttributeError(f"module 'mlm_lightning.model' has no attribute {name!r}")
