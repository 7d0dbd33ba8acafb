"""Learning-rate schedules: the formulas against transformers' own, a time-bounded run that follows its
clock, and an exact resume in the middle of a WSD decay."""

import math

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from mlm_lightning.errors import MLMError
from mlm_lightning.training.schedules import RunSchedule, lr_factor
from tests.support.cli import error_lines, fit_args, run_cli
from tests.support.runs import metric, read_jsonl, state

STEPS, WARMUP = 100, 10


def optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def falling(xs, strictly: bool = True) -> bool:
    return all(a > b if strictly else a >= b for a, b in zip(xs, xs[1:], strict=False))


def curve(scheduler, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule, options, reference, after_warmup", [
    ("linear", {}, lambda o: get_linear_schedule_with_warmup(o, WARMUP, STEPS), False),
    ("cosine", {"min_lr_ratio": 0.1},
     lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, WARMUP, STEPS, min_lr_rate=0.1), False),
    ("wsd", {"decay_share": 0.2},
     lambda o: get_wsd_schedule(o, WARMUP, 20, STEPS, decay_type="1-sqrt"), False),
    # (transformers' WSD warms up from min_lr_ratio, ours from 0 as every other schedule: compared after it)
    ("wsd", {"decay_share": 0.3, "min_lr_ratio": 0.1},
     lambda o: get_wsd_schedule(o, WARMUP, 30, STEPS, decay_type="1-sqrt", min_lr_ratio=0.1), True),
    ("constant", {}, lambda o: get_constant_schedule_with_warmup(o, WARMUP), False),
])
def test_step_schedules_match_transformers(schedule, options, reference, after_warmup):
    ours = curve(RunSchedule(optimizer(), schedule, STEPS, WARMUP, **options), STEPS)
    theirs = curve(reference(optimizer()), STEPS)
    start = WARMUP if after_warmup else 0
    assert max(abs(a - b) for a, b in zip(ours[start:], theirs[start:], strict=True)) < 1e-9
    assert ours[:WARMUP] == pytest.approx([s / WARMUP for s in range(WARMUP)])


def test_wsd_is_constant_then_decays_to_the_floor():
    lrs = curve(RunSchedule(optimizer(), "wsd", STEPS, WARMUP, decay_share=0.25, min_lr_ratio=0.05), STEPS + 1)
    assert set(lrs[WARMUP:75]) == {1.0}
    decay = lrs[75:]
    assert falling(decay) and decay[-1] == pytest.approx(0.05)
    assert lrs[90] == pytest.approx(0.05 + 0.95 * (1 - math.sqrt(15 / 25)))  # 1-sqrt decay, by hand


def test_a_time_bounded_schedule_follows_the_clock_and_the_nearer_budget():
    clock = [0.0]
    s = RunSchedule(optimizer(), "wsd", math.inf, 0.1, decay_share=0.5, max_time=10.0, elapsed=lambda: clock[0])
    seen = {}
    for t in [0.5, 3.0, 4.9, 6.0, 7.5, 10.0, 12.0]:
        clock[0] = t
        s.step()
        seen[t] = s.get_last_lr()[0]
    assert seen[0.5] == pytest.approx(0.5)  # warmup: a share (0.1) of the time
    assert seen[3.0] == seen[4.9] == 1.0
    assert seen[6.0] == pytest.approx(1 - math.sqrt(0.2)) and seen[7.5] == pytest.approx(1 - math.sqrt(0.5))
    assert seen[10.0] == seen[12.0] == pytest.approx(0.0)
    # steps and time both bound the run: whichever is nearer its end sets the progress
    s = RunSchedule(optimizer(), "linear", 100, 0, max_time=10.0, elapsed=lambda: 1.0)
    curve(s, 50)
    assert s.progress == pytest.approx(0.5) and s.get_last_lr()[0] == pytest.approx(0.5)


def test_the_scheduler_state_is_plain_numbers_and_a_resumed_run_takes_its_new_budget(tmp_path):
    first = RunSchedule(optimizer(), "wsd", 100, 10)
    curve(first, 40)
    torch.save(first.state_dict(), tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)  # (what a checkpoint may hold)
    extended = RunSchedule(optimizer(), "wsd", 200, 10)  # the run extended on resume: its decay moves later
    extended.load_state_dict(saved)
    assert extended.last_epoch == 40 and extended.total_steps == 200
    assert curve(extended, 141)[-1] == 1.0 and extended.get_last_lr()[0] < 1.0  # decays from step 180


def test_bad_schedule_options_are_refused():
    for kw, message in [({"schedule": "step"}, "is not one of"), ({"decay_share": 0}, "decay_share"),
                        ({"min_lr_ratio": 2}, "min_lr_ratio")]:
        with pytest.raises(MLMError, match=message):
            RunSchedule(optimizer(), **{"schedule": "wsd", "total_steps": 10, "warmup": 0, **kw})
    with pytest.raises(MLMError, match="has no end"):
        RunSchedule(optimizer(), "wsd", math.inf, 0)
    assert lr_factor("constant", 0.99, 0.0, min_lr_ratio=0.5) == 1.0


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_a_max_time_only_fit_ends_with_a_checkpoint_and_follows_the_clock(corpus, tmp_path, capsys):
    root, log = tmp_path / "timed", tmp_path / "lr.jsonl"
    code = run_cli(*fit_args(corpus, root, "--trainer.max_time", "00:00:00:06", "--model.schedule", "wsd",
                             "--model.decay_share", "0.5", "--model.warmup_steps", "0.1",
                             "--trainer.callbacks+=tests.support.callbacks.RecordLR",
                             "--trainer.callbacks.path", str(log)))
    err = capsys.readouterr().err
    assert code == 0, err
    assert (root / "checkpoints" / "last.ckpt").exists() and "Traceback" not in err
    rows = read_jsonl(log)[1:]  # (the first step's LR was computed before the clock started)
    peak = 1e-3
    for r in rows:
        # the progress is the Timer's elapsed time over max_time, read when the previous step ended
        assert 0 <= r["elapsed"] - r["progress"] * 6 < 1.5
        assert r["lr"] == pytest.approx(peak * lr_factor("wsd", r["progress"], 0.1, 0.5), rel=1e-9)
    assert any(r["lr"] == peak for r in rows if 0.1 < r["progress"] < 0.5)  # the stable phase (machine load
    decaying = [r["lr"] for r in rows if r["progress"] > 0.5]  # decides how many steps fit in the 6 s)
    assert decaying and falling(decaying, strictly=False) and decaying[-1] < peak
    assert state(root)["callbacks"]["Timer"]["time_elapsed"]["train"] >= 6  # the clock is in the checkpoint


@pytest.mark.slow
def test_a_time_bounded_resume_continues_the_clock(corpus, tmp_path, capsys):
    root, log = tmp_path / "timed", tmp_path / "lr.jsonl"
    timed = ["--trainer.max_time", "00:00:00:10", "--model.schedule", "wsd", "--model.decay_share", "0.5",
             "--trainer.callbacks+=tests.support.callbacks.RecordLR", "--trainer.callbacks.path", str(log)]
    code = run_cli(*fit_args(corpus, root, *timed, "--trainer.callbacks+=tests.support.callbacks.SignalAt",
                             "--trainer.callbacks.step", "3"))  # (early: a loaded machine takes seconds a step)
    assert code == 143, capsys.readouterr().err
    stopped = state(root)["callbacks"]["Timer"]["time_elapsed"]["train"]
    before = len(read_jsonl(log))
    assert run_cli(*fit_args(corpus, root, *timed, "--ckpt_path", "last")) == 0
    resumed = read_jsonl(log)[before:]
    assert resumed[0]["step"] == 3 and resumed[0]["elapsed"] == pytest.approx(stopped, abs=0.5)
    assert resumed[-1]["progress"] > 0.5 and resumed[-1]["lr"] < 1e-3  # the decay ran before the 10 s were up


WSD = ["--trainer.max_steps", "24", "--model.schedule", "wsd", "--model.decay_share", "0.5",
       "--model.warmup_steps", "2", "--model.min_lr_ratio", "0.1", "--trainer.val_check_interval", "8"]


@pytest.mark.slow
def test_wsd_resume_in_the_middle_of_the_decay_is_exact(corpus, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*fit_args(corpus, straight, *WSD)) == 0
    lr = metric(straight, "train/lr")
    assert [lr[s] for s in range(2, 12)] == [pytest.approx(1e-3)] * 10  # constant after the warmup
    decay = [lr[s] for s in range(12, 24)]
    assert falling(decay) and decay[-1] > 1e-4  # ... then decays to 0.1 of it
    code = run_cli(*fit_args(corpus, resumed, *WSD, "--trainer.callbacks+=tests.support.callbacks.SignalAt",
                             "--trainer.callbacks.step", "17"))
    assert code == 143, capsys.readouterr().err
    assert state(resumed)["global_step"] == 17
    assert run_cli(*fit_args(corpus, resumed, *WSD, "--ckpt_path", "last")) == 0
    assert metric(resumed, "train/lr") == pytest.approx(lr, abs=1e-12)
    a, b = state(straight)["state_dict"], state(resumed)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_run_with_no_end_is_refused_before_any_work(corpus, tmp_path, capsys):
    code = run_cli(*fit_args(corpus, tmp_path / "forever", "--trainer.max_epochs", "-1"))
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "the run has no end" in err
    assert not (tmp_path / "forever").exists()


def test_a_time_bounded_schedule_sends_rank_0s_clock_only_every_log_interval():
    """Several processes: each broadcast of rank 0's clock is a host sync; sent every log_every_n_steps steps only,
    and between them every process extrapolates the same clock from the broadcast values."""
    from datetime import timedelta
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from mlm_lightning.training.schedules import run_schedule

    timer, clock, sent = Timer(duration=timedelta(seconds=100)), [0.0], []
    timer.time_elapsed = lambda stage="train": clock[0]
    trainer = SimpleNamespace(callbacks=[timer], world_size=2, log_every_n_steps=10, global_step=0,
                              estimated_stepping_batches=float("inf"),
                              strategy=SimpleNamespace(broadcast=lambda x, src=0: sent.append(x) or x))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = run_schedule(optimizer, trainer, "linear", 0, 0.1, 0.0)
    lrs = {}
    for step in range(1, 31):
        clock[0], trainer.global_step = float(step), step
        optimizer.step()
        schedule.step()
        lrs[step] = optimizer.param_groups[0]["lr"]
    assert len(sent) == 4  # at the start, then at steps 10, 20 and 30
    assert lrs[25] == pytest.approx(0.75) and lrs[30] == pytest.approx(0.70)  # 25 s of 100 extrapolated, 30 s sent
