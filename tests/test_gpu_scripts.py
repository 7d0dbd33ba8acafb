"""The GPU check gets one run on a lent GPU machine (15 minutes, its start included, no package registry): these
tests make that run safe from here. The preflight names a missing module in one line; a stage past its budget or
the deadline is stopped with its streamed output kept and the summary still printed, also on SIGTERM; a CPU run
never judges timing; the wheels cover what the machine lacks; and the whole check passes in a venv holding only
the machine's packages plus those wheels (the dry run, slow). The benchmark's CPU smoke mode runs too (slow)."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tests.support import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
SUMMARY = "======== gpu_check summary ========"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclass looks itself up there)
    spec.loader.exec_module(module)  # (stdlib imports only: the parent never imports torch)
    return module


def run_check(*args, env=None, timeout=300):
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def workers_left() -> list[str]:
    """This checkout's stage processes still running (a stopped stage must not outlive the check)."""
    script = str(ROOT / "scripts" / "gpu_check.py")
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if script in line and "--worker" in line]


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_preflight_names_a_missing_module_in_one_line_and_runs_nothing(tmp_path):
    shim = tmp_path / "shim" / "jsonargparse"  # on PYTHONPATH before site-packages: as if it were not installed
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'jsonargparse'\","
                                      " name='jsonargparse')\n")
    out = tmp_path / "out"
    done = run_check("--stages", "sync", env={"PYTHONPATH": str(shim.parent), "OUT": str(out)})
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "module 'jsonargparse' is missing" in last
    assert "bash scripts/gpu_wheels.sh .whl" in last and "--no-index --no-deps" in last and "--target /tmp/site" in last
    assert "Traceback" not in done.stdout + done.stderr and "stage sync" not in done.stdout
    assert (out / "gpu_check_summary.txt").read_text().strip() == last.removeprefix("gpu_check: ")


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_a_stage_past_its_budget_is_cut_the_next_is_skipped_and_the_summary_comes(tmp_path):
    done = run_check("--stages", "sync,families", "--budgets", "sync=3", "--deadline", "40",
                     env={"OUT": str(tmp_path)})
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split(SUMMARY)[1]
    assert re.search(r"sync: CUT after \d+ s \(its budget\)", summary)
    assert re.search(r"families: SKIPPED \(\d+ s left before the deadline", summary)
    assert "exit 1" in summary
    assert SUMMARY in (tmp_path / "gpu_check.log").read_text()  # the console, as it came
    assert "sync: CUT" in (tmp_path / "gpu_check_summary.txt").read_text()
    assert not workers_left()


@pytest.mark.slow  # (over 5 s: the default suite stays quick; CI runs it)
def test_sigterm_from_the_hard_limit_still_prints_the_summary(tmp_path):
    start = time.monotonic()
    done = run_check("--stages", "sync,families", "--deadline", "300", env={"OUT": str(tmp_path),
                                                                           "GPU_CHECK_LIMIT": "15"})
    assert done.returncode == 124  # timeout's own status: the hard limit struck
    assert time.monotonic() - start < 15 + 10  # the summary came before timeout's SIGKILL (-k 10)
    summary = done.stdout.split(SUMMARY)[1]
    assert re.search(r"^(preflight|sync|families): CUT by SIGTERM", summary, re.M), summary  # (whichever it struck)
    assert "CUT by SIGTERM" in (tmp_path / "gpu_check_summary.txt").read_text()
    time.sleep(1)
    assert not workers_left()


def test_a_stopped_stage_keeps_what_it_printed_in_the_log(tmp_path):
    gpu_check = gpu_check_module()
    console = gpu_check.Console(str(tmp_path))
    stage = ("import time; print('gpu_check: x: 42 tokens/s', flush=True); print('more', flush=True);"
             " time.sleep(60)")
    start = time.monotonic()
    code, figures = gpu_check.run_stage([sys.executable, "-c", stage], 3, console, {})
    assert code is None and time.monotonic() - start < 15  # stopped at its timeout (SIGTERM to its group)
    assert figures == ["x: 42 tokens/s"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "gpu_check: x: 42 tokens/s\nmore\n" in log


def test_cpu_runs_report_ratios_but_never_judge_them(tmp_path, monkeypatch, capsys):
    gpu_check = gpu_check_module()
    bad = {"fit_tps": 1.0, "loop_tps": 10.0, "hf_tps": 10.0, "fit_mfu": 0.01, "syncs_per_step": 3.0}
    monkeypatch.delenv("OUT", raising=False)
    cpu = SimpleNamespace(cpu=True, deadline=100)
    assert gpu_check.summarize(["bench: ..."], bad, cpu, time.monotonic(), 0, gpu_check.Console(None)) == 0
    printed = capsys.readouterr().out
    assert "0.10x (not judged on a CPU" in printed and "MISSED" not in printed
    lines, missed = gpu_check.judge(bad, cpu=False)
    assert missed and sum("MISSED" in line for line in lines) == 4
    good = {"fit_tps": 10.0, "loop_tps": 10.0, "hf_tps": 4.0, "fit_mfu": 0.5, "syncs_per_step": 0.0}
    lines, missed = gpu_check.judge(good, cpu=False)
    assert not missed and sum(line.endswith(" met") for line in lines) == 4


def test_the_wheels_bring_every_runtime_dependency_the_gpu_machine_lacks():
    """pyproject.toml's runtime dependencies, and theirs (as installed here) down to what the GPU machine holds:
    each is on the machine or among the wheels, one version of each."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    wheels = re.findall(r"^  ([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "scripts" / "gpu_wheels.sh").read_text(), re.M)
    names = [canonicalize_name(n) for n, _ in wheels]
    assert len(names) == len(set(names)) and "jsonargparse" in names
    dry_run = (ROOT / "scripts" / "gpu_dry_run.sh").read_text()
    machine = {canonicalize_name(n) for n in dry_run.split('GPU_MACHINE="')[1].split('"')[0].split()}
    assert {"torch", "lightning", "transformers", "accelerate"} <= machine
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen, lacking = [Requirement(r) for r in [*project, "accelerate"]], set(), set()
    env = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux"}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, tuple(req.extras)) in seen or (req.marker and not req.marker.evaluate({**env, "extra": ""})):
            continue
        seen.add((name, tuple(req.extras)))
        if name in machine:
            continue  # its own needs are the machine's business
        lacking.add(name)
        for text in md.requires(name) or []:
            dep = Requirement(text)
            if not dep.marker or any(dep.marker.evaluate({**env, "extra": e}) for e in ["", *req.extras]):
                todo.append(Requirement(str(dep).split(";")[0]))
    assert lacking <= set(names), f"not on the GPU machine and not among the wheels: {sorted(lacking - set(names))}"


@pytest.mark.slow
def test_benchmark_gpu_mode_times_the_real_fit_beside_the_loop_on_a_cpu():
    done = subprocess.run([sys.executable, "scripts/benchmark.py", "--mode", "gpu", "--tiny", "--steps", "2",
                           "--warmup", "1", "--precision", "32-true", "--only", "loop,ours"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "(b) plain loop" in out and "(c) ours, Lightning fit" in out and "(c)/(b) = " in out
    assert "(c) at the config's intervals: a validation" in out  # the real fit validated and saved
    assert "no MFU" in out  # a CPU has no peak in the table


@pytest.mark.slow
def test_the_whole_check_passes_in_a_venv_holding_only_the_gpu_machines_packages_and_the_wheels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(["bash", "scripts/gpu_dry_run.sh"], cwd=ROOT, env={**env, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    summary = done.stdout.split(SUMMARY)[1]
    assert "preflight: python" in summary and "jsonargparse 4.53.0" in summary
    assert re.search(r"jsonargparse 4\.53\.0 \(/tmp/[^)]*\)", summary)  # from the carried wheels, not the venv
    assert re.search(r"bench: fit \(real mlm-lightning fit\): [\d,]+ real tokens/s", summary)
    assert re.search(r"bench: plain loop: [\d,]+ real tokens/s", summary)
    assert "sync: fit of configs/bert-base-gpu.yaml, 30 steps" in summary and "exit 0" in summary
    assert re.search(r"hf: HF run_mlm \+ Trainer: [\d,]+ real tokens/s", summary)
    rates = re.findall(r"families: (\w+) [\d,]+ real tokens/s, attention sdpa", summary)
    assert rates == ["bert", "roberta", "modernbert"]  # no flash-attn here: `auto` is SDPA
    assert "fsdp: skipped" in summary
    assert "not judged on a CPU" in summary and "MISSED" not in summary and "FAILED" not in summary
    assert (tmp_path / "gpu_check_summary.txt").read_text().startswith(SUMMARY)
