"""Weighted mixtures of sources: token shares follow the weights, epochs end as documented, resume is exact, the plan
does not depend on loader workers or process count, validation is reported per source."""

import numpy as np
import pytest
import torch

from mlm_lightning.data import mixture
from mlm_lightning.data.module import MLMDataModule
from mlm_lightning.data.sampling import BatchPlan, MixturePlan
from mlm_lightning.errors import MLMError
from tests.support.cli import fit_args, run_cli
from tests.support.runs import metric_rows
from tests.support.text import sentences


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A "domain" source of short lines and a "general" one of lines three times as long (by tokens)."""
    root = tmp_path_factory.mktemp("mix")
    (root / "domain.txt").write_text("\n".join(sentences(1500)) + "\n")
    long = [" ".join(sentences(3, seed=i)) for i in range(1500)]
    (root / "general.txt").write_text("\n".join(long) + "\n")
    (root / "domain-val.txt").write_text("\n".join(sentences(40, seed=9)) + "\n")
    (root / "general-val.txt").write_text("\n".join(long[:30]) + "\n")
    return root


def spec(root, val=False, w=(0.8, 0.2)):
    out = [{"path": str(root / "domain.txt"), "weight": w[0]}, {"path": str(root / "general.txt"), "weight": w[1]}]
    if val:
        out[0]["val_files"], out[1]["val_files"] = str(root / "domain-val.txt"), str(root / "general-val.txt")
    return out


def mixed(root, tmp_path, **kw) -> MLMDataModule:
    kw.setdefault("val", True)
    dm = MLMDataModule(train_files=spec(root, kw.pop("val")), cache_dir=str(tmp_path / "cache"), vocab_size=200,
                       max_length=32, batch_size=8, line_by_line=True, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def shares(batches) -> dict[str, float]:
    tokens: dict[str, int] = {}
    for b in batches:
        tokens[b["source"]] = tokens.get(b["source"], 0) + b["num_real_tokens"]
    return {k: v / sum(tokens.values()) for k, v in tokens.items()}


def test_token_share_follows_the_weights_and_the_first_source_to_run_out_ends_the_epoch(sources, tmp_path):
    dm = mixed(sources, tmp_path)
    assert len({*dm._data_dirs()}) == 2  # each source tokenized into its own cache
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) >= 200
    share = shares(batches[:200])
    assert abs(share["domain"] - 0.8) < 0.02 and abs(share["general"] - 0.2) < 0.02, share
    by_batches = sum(b["source"] == "domain" for b in batches[:200]) / 200
    assert by_batches > 0.88  # drawn by tokens, not batches: a general batch holds ~3x the tokens of a domain one
    plan = loader.batch_sampler
    domain_batches = len(plan.plans[0].plan(0))
    assert sum(b["source"] == "domain" for b in batches) == domain_batches  # the domain source ran out: epoch over
    seen = [i for _, p, b in plan.plan(0) for i in b if _ == 0]
    assert len(seen) == len(set(seen))  # no example twice in an epoch


def test_epoch_tokens_sets_the_epoch_and_sources_start_new_passes(sources, tmp_path):
    dm = mixed(sources, tmp_path, epoch_tokens=200_000)
    plan = dm.train_dataloader().batch_sampler
    schedule = plan.schedule(0)
    tokens = sum(plan.lengths[s][b].sum() for s, _, b in schedule)
    assert 200_000 <= tokens < 200_000 + 8 * 32
    assert max(p for _, p, _ in schedule) >= 1  # the domain source ran out and went on with a new seeded pass
    share = sum(plan.lengths[s][b].sum() for s, _, b in schedule if s == 0) / tokens
    assert abs(share - 0.8) < 0.01


def test_resume_mid_epoch_is_exact(sources, tmp_path):
    first = list(mixed(sources, tmp_path).train_dataloader())
    again = mixed(sources, tmp_path).train_dataloader()
    again.load_state_dict({"epoch": 0, "batches_done": 37, "seed": 42, "num_replicas": 1})
    rest = list(again)
    assert len(rest) == len(first) - 37
    for a, b in zip(first[37:], rest, strict=True):
        assert a["source"] == b["source"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])  # masks too


def test_plan_is_the_same_for_any_number_of_workers_and_processes(sources, tmp_path):
    dm = mixed(sources, tmp_path)
    alone = [b["input_ids"] for _, b in zip(range(30), dm.train_dataloader(), strict=False)]
    dm.hparams.num_workers = 2
    with_workers = [b["input_ids"] for _, b in zip(range(30), dm.train_dataloader(), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(alone, with_workers, strict=True))
    rng = np.random.default_rng(0)
    lengths = [rng.integers(4, 30, 300), rng.integers(4, 30, 500)]
    plans = [BatchPlan(x, 8, seed=s) for s, x in enumerate(lengths)]
    whole = list(MixturePlan(plans, lengths, [0.8, 0.2], [0, 300]))
    for world in (2, 3):
        ranks = [list(MixturePlan(plans, lengths, [0.8, 0.2], [0, 300], num_replicas=world, rank=r))
                 for r in range(world)]
        assert len({len(r) for r in ranks}) == 1  # lockstep
        interleaved = [ranks[i % world][i // world] for i in range(world * len(ranks[0]))]
        assert interleaved == whole[: len(interleaved)]  # the same plan, split between the processes


def test_validation_per_source(sources, tmp_path):
    dm = mixed(sources, tmp_path)
    val = list(dm.val_dataloader())
    names = [b["source"] for b in val]
    assert names == sorted(names, key=["domain", "general"].index)  # each source's batches, never mixed
    counts = {n: sum(len(b["input_ids"]) for b in val if b["source"] == n) for n in ("domain", "general")}
    assert counts == {"domain": 40, "general": 30}  # every line of each source's own val_files


def test_source_logger_reports_token_shares_and_per_source_validation_loss():
    logged = {}

    class Module:
        def log_dict(self, d, **kw):
            logged.update(d)

        def log(self, k, v, **kw):
            logged[k] = float(v)

    cb = mixture.SourceLogger(["a", "b"])
    for source, n in (("a", 30), ("b", 10), ("a", 60)):
        cb.on_train_batch_end(None, Module(), None, {"source": source, "num_real_tokens": n}, 0)
    assert logged == {"perf/source_share/a": 0.9, "perf/source_share/b": 0.1}
    batch = {"source": "b", "masked_positions": torch.arange(5)}
    cb.on_validation_batch_end(None, Module(), torch.tensor(2.5), batch, 0)
    assert logged["val/loss/b"] == 2.5


@pytest.mark.parametrize("train, kw, message", [
    ([{"path": "D", "weight": 0}], {}, "weight must be a positive number"),
    ([{"path": "D", "wieght": 1}], {}, "unknown keys ['wieght']"),
    ([{"path": "D"}, {"path": "D"}], {}, "names ['domain', 'domain'] repeat"),
    ([{"path": "D"}], {"val_files": "D"}, "give each source its own val_files"),
    ([{"path": "D", "val_files": "D"}, {"path": "G", "name": "g"}], {}, "give every source its own val_files"),
    ([{"path": "D", "name": "a/b"}], {}, "may hold only letters"),
])
def test_bad_mixtures_are_one_line(sources, tmp_path, train, kw, message):
    fill = {"D": str(sources / "domain.txt"), "G": str(sources / "general.txt")}
    train = [{k: fill.get(v, v) for k, v in item.items()} for item in train]
    kw = {k: fill.get(v, v) for k, v in kw.items()}
    with pytest.raises(MLMError) as e:
        MLMDataModule(train_files=train, cache_dir=str(tmp_path), **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_fit_on_a_mixture_logs_shares_and_per_source_validation(sources, tmp_path):
    import json

    code = run_cli(*fit_args(json.dumps(spec(sources, val=True)), tmp_path, "--trainer.max_steps", "4",
                             "--trainer.val_check_interval", "4", "--data.cache_dir", str(tmp_path / "cache")))
    assert code == 0
    rows = metric_rows(tmp_path)
    shares = [r for r in rows if r.get("perf/source_share/domain")]
    assert shares and abs(float(shares[-1]["perf/source_share/domain"]) - 0.8) < 0.2
    assert any(r.get("val/loss/general") for r in rows) and any(r.get("val/loss") for r in rows)


@pytest.mark.slow
def test_interrupted_mixture_fit_resumes_exactly(sources, tmp_path, capsys):
    import json
    import signal

    def fit(root, *extra):
        return run_cli(*fit_args(json.dumps(spec(sources)), root, "--trainer.max_steps", "12",
                                 "--trainer.val_check_interval", "6", "--data.cache_dir", str(tmp_path / "cache"),
                                 *extra))

    assert fit(tmp_path / "straight") == 0
    code = fit(tmp_path / "run", "--trainer.callbacks+=tests.support.callbacks.SignalAt",
               "--trainer.callbacks.step", "5")
    assert code == 128 + signal.SIGTERM, capsys.readouterr().err
    assert fit(tmp_path / "run", "--ckpt_path", "last") == 0
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for r in (tmp_path / "straight", tmp_path / "run"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
