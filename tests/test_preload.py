"""The suite's preloaded Python (tests/preload.py): a command run through it is a process of its own, and a
training through it equals one in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import preload
import pytest
import torch
from conftest import _PRELOAD, BUNDLE_ENV, run_python, training_command

SCRIPT = """
import os, sys
print(os.getcwd(), os.environ["PROBE"], sys.argv[1:], sys.path[0], flush=True)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise RuntimeError("boom")
if sys.argv[1] == "sleep":
    import time
    print(os.getpid(), flush=True)
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


def test_a_command_is_its_own_process_with_its_folder_environment_and_status(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = {**BUNDLE_ENV, "PROBE": "seen"}
    proc = run_python([str(script), "3"], env=env, cwd=tmp_path)
    assert proc.returncode == 3
    assert proc.stdout.split() == [str(tmp_path), "seen", "['3']", str(tmp_path)] and proc.stderr == "to stderr\n"
    failed = run_python([str(script), "raise"], env=env, cwd=tmp_path)
    assert failed.returncode == 1 and "RuntimeError: boom" in failed.stderr and "Traceback" in failed.stderr
    # a variable read when OpenMP loads cannot be served by a fork: that command gets a fresh interpreter
    assert _PRELOAD.serves(env) and not _PRELOAD.serves({**env, "OMP_NUM_THREADS": "1"})


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_python([str(script), "sleep"], env={**BUNDLE_ENV, "PROBE": "x"}, cwd=tmp_path, timeout=3)
    assert time.monotonic() - start < 30


def test_a_training_through_it_equals_one_in_a_fresh_interpreter(tiny_runs, tiny_dataset, tmp_path: Path) -> None:
    # tiny_runs["cbvae"] was trained through the preloaded Python with these arguments
    off = ("--use_wandb", "false", "--use_mlflow", "false")
    fresh = preload.run(
        None, training_command(tiny_dataset, tmp_path / "fresh", 1, *off), BUNDLE_ENV, _PRELOAD.cwd, 900
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    history = [json.loads((run / "history.json").read_text()) for run in (tiny_runs["cbvae"], tmp_path / "fresh")]
    assert history[0] == history[1]
    weights = [torch.load(run / "model.pt", weights_only=True) for run in (tiny_runs["cbvae"], tmp_path / "fresh")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
