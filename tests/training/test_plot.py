"""The metrics reader and the plot of a run."""

import csv


def test_read_metrics_joins_versions_later_wins(tmp_path):
    from mlm_lightning.training.plot import read_metrics

    for version, steps in ((0, range(0, 10)), (1, range(5, 15))):
        d = tmp_path / "lightning_logs" / f"version_{version}"
        d.mkdir(parents=True)
        with open(d / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "train/loss", "val/ppl"])
            w.writerows([0, s, 100 * version + s, ""] for s in steps)
    loss = read_metrics(str(tmp_path))["train/loss"]
    assert [s for s, _ in loss] == list(range(1, 16))
    assert [v for _, v in loss] == [float(s) for s in range(5)] + [100.0 + s for s in range(5, 15)]
