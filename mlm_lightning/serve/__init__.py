"""`mlm-lightning serve`: the HTTP server (`app`), its request batcher and its page (`static/`).

Nothing is imported here: `mlm_lightning.serve.batcher` must not pull in FastAPI.
"""
