"""scripts/run_main.sh's wiring, fast: which steps run with which arguments, through an interpreter that records
the dataset and bundle commands instead of running them (the real run is test_runpod_container's end-to-end test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECORDER = """#!/bin/sh
# the builder and the bundle are recorded (a training leaves an exported decoder); anything else runs for real
case "$1 $2" in
  "-m cbvae_ext.data"|"-m monai.bundle")
    printf '%s\\n' "$*" >> {log}
    printf 'progress 10%%\\rprogress 100%%\\n'  # a progress bar's carriage returns
    case " $* " in *" run training "*)
      out=$(printf '%s\\n' "$@" | sed -n '/^--output_dir$/{{n;p;}}')
      mkdir -p "$out" && echo ts > "$out/decoder.ts" && echo {{}} > "$out/decoder_schema.json" ;;
    esac
    exit 0 ;;
esac
exec {python} "$@"
"""


def run_pipeline(repo_root: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "commands.log"
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER.format(log=log, python=sys.executable))
    recorder.chmod(0o755)
    env = {**os.environ, "PYTHON": str(recorder), "CBVAE_TRAIN_ARGS": "--lr 0.001"}
    env.pop("CBVAE_NEUROSYNTH_DIR", None)
    proc = subprocess.run(
        [str(repo_root / "scripts" / "run_main.sh"), "--no-setup", "--out", str(tmp_path / "out"), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc, log.read_text().splitlines() if log.exists() else []


def test_pipeline_builds_trains_every_run_and_evaluates_them_all(repo_root: Path, tmp_path: Path):
    args = [
        "--subset",
        "30",
        "--epochs",
        "2",
        "--resolution",
        "2",
        "--kernel",
        "mkda",
        "--fwhm",
        "9",
        "--preset",
        "gpu",
    ]
    proc, commands = run_pipeline(repo_root, tmp_path, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out, data = tmp_path / "out", tmp_path / "out" / "data_30"
    build, *trainings, evaluate = commands
    assert build.startswith(f"-m cbvae_ext.data build --out {data} --resolution 2 --kernel mkda --kernel-fwhm 9")
    assert build.endswith("--subset 30") and " --terms " in build  # NeuroQuery's terms for the evaluation
    # the twins are trained exactly when their overlays exist (bundle/configs/train_uncond.yaml, ...)
    twins = [n for n in ("uncond", "nolambda") if (repo_root / "bundle" / "configs" / f"train_{n}.yaml").is_file()]
    names = ["cbvae", "baseline", *twins]
    assert len(trainings) == len(names)
    for name, command in zip(names, trainings, strict=True):
        assert "run training" in command and f"--output_dir {out / name} " in command
        assert f"--dataset_dir {data} --epochs 2" in command and command.endswith("--lr 0.001")
        configs = "'bundle/configs/train.yaml','bundle/configs/preset_gpu.yaml'"  # the GPU preset is an overlay
        configs += "" if name == "cbvae" else f",'bundle/configs/train_{name}.yaml'"
        assert f"--config_file [{configs}] " in command and "--preset" not in command
    assert evaluate.startswith("-m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml")
    assert f"--run_dir {out / 'cbvae'}" in evaluate and f"--output_dir {out / 'eval'}" in evaluate
    for name in names[1:]:
        assert f"--{name}_run_dir {out / name}" in evaluate
    assert json.loads((out / "status.json").read_text())["state"] == "done" and (out / "DONE").exists()
    steps = ["dataset", *(f"train_{n}" for n in names), "check_decoder", "evaluate"]
    assert {p.name for p in (out / "logs").iterdir()} == {f"{s}.log" for s in steps} | {"step_times.tsv"}
    # each step's wall and CPU seconds, in the order they ran
    header, *rows = [line.split("\t") for line in (out / "logs" / "step_times.tsv").read_text().splitlines()]
    assert header == ["step", "wall_s", "cpu_user_s", "cpu_sys_s"] and [r[0] for r in rows] == steps
    assert all(float(v) >= 0 for r in rows for v in r[1:])
    # the console keeps the live bars, the log each line's final state
    assert "progress 10%" in proc.stdout
    assert (out / "logs" / "dataset.log").read_text() == "progress 100%\n"
    assert "--server.address 127.0.0.1" in proc.stdout.splitlines()[-1]


def test_no_terms_and_a_local_neuroquery_copy(repo_root: Path, tmp_path: Path):
    proc, commands = run_pipeline(repo_root, tmp_path, "--subset", "30", "--no-terms")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--terms" not in commands[0] and "--neuroquery-dir" not in commands[0]
    second, nq = tmp_path / "second", tmp_path / "nq"
    second.mkdir(), nq.mkdir()
    proc, commands = run_pipeline(repo_root, second, "--subset", "30", "--neuroquery-dir", str(nq))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f" --neuroquery-dir {nq} " in commands[0] and "--terms" not in commands[0]


def test_pipeline_rebuilds_through_the_builder_on_every_run(repo_root: Path, tmp_path: Path):
    """An existing dataset folder is never skipped: the builder's cache key decides whether to reuse it."""
    (tmp_path / "out" / "data_30").mkdir(parents=True)
    (tmp_path / "out" / "data_30" / "manifest.json").write_text("{}")
    for _ in range(2):
        proc, commands = run_pipeline(repo_root, tmp_path, "--subset", "30", "--epochs", "1")
        assert proc.returncode == 0, proc.stderr
    assert sum(c.startswith("-m cbvae_ext.data build") for c in commands) == 2
