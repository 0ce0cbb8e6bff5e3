"""scripts/gpu_check.sh on CPU with its tiny setting: the real benchmark, dataset step, four trainings and evaluation
(through run_main.sh), every figure and time under one folder; bad options are one error line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ENV, NEUROQUERY_DIR, TINY_TERM_DIMS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # CBVAE_NEUROQUERY_DIR, CBVAE_TERM_DIMS: where the session's tiny dataset took its terms from and its terms
    # condition (so the builder reuses it)
    env = {**BUNDLE_ENV, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CBVAE_NEUROQUERY_DIR": str(NEUROQUERY_DIR),
           "CBVAE_TERM_DIMS": str(TINY_TERM_DIMS)}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_check_on_cpu_writes_every_figure_under_one_folder(
    tmp_path: Path, tiny_dataset: Path, neurosynth_dir: Path
) -> None:
    out = tmp_path / "check"
    # a copy of the session's tiny dataset, which has the tiny setting's build options: run_main.sh's builder
    # reuses it (a copy, so that its lock never meets another test's builder on the shared dataset)
    data = shutil.copytree(tiny_dataset, tmp_path / "tiny")
    proc = _run("--tiny", "--no-setup", "--out", str(out), "--data-dir", str(data),
                "--neurosynth-dir", str(neurosynth_dir))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "device cpu" in summary and "train step:" in summary and "maps/s" in summary
    header, *lines = (out / "step_times.tsv").read_text().splitlines()
    assert header.split("\t") == ["step", "wall_s", "cpu_user_s", "cpu_sys_s"]
    rows = {
        name: (float(wall), float(user), float(sys_)) for name, wall, user, sys_ in (line.split("\t") for line in lines)
    }
    trained = [f"train_{n}" for n in ("cbvae", "baseline", "uncond", "nolambda")]
    # the benchmark, the whole of run_main.sh, then each of its steps (logs/step_times.tsv)
    assert list(rows) == ["bench_train", "run_main", "dataset", *trained, "check_decoder", "evaluate"]
    for name in ("bench_train", "dataset", *trained, "evaluate"):
        wall, user, sys_ = rows[name]
        assert wall > 0 and user > 0 and sys_ >= 0, (name, rows[name])  # a real process ran, and was timed
    steps = sum(rows[n][0] for n in rows if n not in ("bench_train", "run_main"))
    assert steps <= rows["run_main"][0] + 0.5 and rows["run_main"][1] >= rows["evaluate"][1]  # parts of the whole
    assert (out / "main" / "logs" / "step_times.tsv").read_text().splitlines()[1:] == lines[2:]
    results = json.loads((out / "main" / "eval" / "test_results.json").read_text())
    assert set(results["models"]) == {"cbvae", "baseline", "uncond", "nolambda"}  # evaluated together
    assert results["n_test"] > 0
    for name in results["models"]:
        assert (out / "main" / name / "decoder.ts").is_file(), name
    assert (out / "main" / "DONE").is_file() and not (out / "main" / "data_120").exists()  # the dataset reused


def test_step_times_record_a_childs_cpu_time_and_keep_earlier_rows(tmp_path: Path) -> None:
    # scripts/step_times.sh (run_main.sh's and this script's step clock): two "jobs" into one file, as a resume does
    times = tmp_path / "step_times.tsv"
    burn = f"{sys.executable} -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass'"
    job = f"source scripts/step_times.sh; step_times_start {times}; step_time_begin; {burn}; sleep 0.2; step_time_end {times} burn"
    for _ in range(2):
        subprocess.run(["bash", "-c", job], cwd=SCRIPT.parents[1], check=True, timeout=60)
    header, *rows = [line.split("\t") for line in times.read_text().splitlines()]
    assert header == ["step", "wall_s", "cpu_user_s", "cpu_sys_s"] and len(rows) == 2  # one header, rows appended
    for name, wall, user, sys_ in rows:
        # the child's CPU time is counted (a subshell's `times` would read 0), the sleep is wall time only
        assert name == "burn" and float(user) + float(sys_) >= 0.25 and float(wall) >= 0.45, rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "error: --epochs must be a positive integer, got '0'"),
        (["--frobnicate"], "error: unknown option --frobnicate (see --help)"),
        ([], "error: torch sees no CUDA device here; run on a GPU machine, or add --tiny for the CPU smoke run"),
    ],
)
def test_bad_options_and_a_missing_gpu_are_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    if not args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run")
    proc = _run(*args, "--no-setup", "--out", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "x").exists()  # nothing written before the checks pass
