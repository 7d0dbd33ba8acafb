"""Text for tiny corpora: random sentences over a small vocabulary, and datasets saved to disk."""

from __future__ import annotations

import json
import random

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "calls"]
OBJECTS = ["the ball", "a tree", "the river", "a small house", "the old car", "the red door"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(n)]


def save_to_disk(directory, texts: list[str], shards: int = 2) -> None:
    """What `datasets`' `Dataset.save_to_disk` writes (without needing `datasets`): data-0000i-of-0000n.arrow
    (Arrow IPC streams, columns id and text), state.json listing them, and dataset_info.json."""
    import numpy as np
    import pyarrow as pa

    directory.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(texts)), shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for name, rows in zip(names, chunks, strict=True):
        table = pa.table({"id": rows.tolist(), "text": [texts[i] for i in rows]})
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=50)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "f", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (directory / "state.json").write_text(json.dumps(state))
    features = {"id": {"dtype": "int64", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"}}
    (directory / "dataset_info.json").write_text(json.dumps({"features": features}))
