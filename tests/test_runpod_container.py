"""The container: a static check of the Dockerfile (no Docker daemon here) and the entry script run for real."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
         "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}  # fmt: skip


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and ``\\`` continuations joined."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word, rest.strip()))
    return out


def dockerignored(repo_root: Path, relpath: str) -> bool:
    ignored = False
    for pattern in (repo_root / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if pattern and not pattern.startswith("#"):
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!")
            if fnmatch.fnmatch(relpath, pattern) or relpath.startswith(pattern.rstrip("/") + "/"):
                ignored = not negate
    return ignored


def test_dockerfile_is_well_formed_and_its_entrypoint_is_the_entry_script(repo_root: Path):
    instructions = dockerfile_instructions(repo_root / "Dockerfile")
    names = [name for name, _ in instructions]
    assert set(names) <= KNOWN, set(names) - KNOWN
    assert names[0] == "FROM" and names.count("FROM") == 1
    image = instructions[0][1]
    assert image.startswith("pytorch/pytorch:") and "-cuda12." in image and image.endswith("-runtime")
    torch_version = tuple(int(x) for x in image.split(":")[1].split("-")[0].split(".")[:2])
    assert (2, 4) <= torch_version < (2, 15)  # inside pyproject's torch range: pip keeps the CUDA build
    workdir = next(args for name, args in instructions if name == "WORKDIR")
    copied = {}
    for name, args in instructions:
        if name == "COPY":
            *sources, dest = shlex.split(args)
            for source in sources:
                assert (repo_root / source).exists(), f"COPY source {source} missing"
                assert not dockerignored(repo_root, source), f"COPY source {source} is excluded by .dockerignore"
                copied[source] = dest
    assert any("pip install ." in args for name, args in instructions if name == "RUN")
    entry = json.loads(next(args for name, args in instructions if name == "ENTRYPOINT"))
    assert entry == [f"{workdir}/scripts/runpod_train.sh"] and copied["scripts"] == "./scripts"
    script = repo_root / "scripts" / "runpod_train.sh"
    assert os.access(script, os.X_OK)


def test_dockerignore_keeps_secrets_and_data_out(repo_root: Path):
    for path in (".env", ".env.local", "runs/x/model.pt", "data_out/maps.npy", ".venv/bin/python", "wandb/run"):
        assert dockerignored(repo_root, path), path
    assert not dockerignored(repo_root, ".env.example")
    example = (repo_root / ".env.example").read_text().splitlines()
    keys = dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
    assert keys == {"RUNPOD_API_KEY": "", "WANDB_API_KEY": "", "CBVAE_IMAGE": ""}  # no value committed


def run_entry(
    repo_root: Path, args: list[str], env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **env}
    full.pop("WANDB_API_KEY", None)
    script = repo_root / "scripts" / "runpod_train.sh"
    return subprocess.run([str(script), *args], env=full, capture_output=True, text=True, timeout=timeout)


def test_entry_script_help_and_bad_arguments(repo_root: Path):
    assert subprocess.run(["bash", "-n", str(repo_root / "scripts" / "runpod_train.sh")]).returncode == 0
    help_ = run_entry(repo_root, ["--help"], {})
    assert help_.returncode == 0 and "status.json" in help_.stdout and "--subset" in help_.stdout
    for args, message in [
        (["--epochs", "0"], "error: --epochs must be a positive integer, got '0'"),
        (["--subset", "ten"], "error: --subset must be a positive integer or all"),
        (["--neurosynth-dir", "/no/such/dir"], "error: --neurosynth-dir /no/such/dir does not exist"),
        (["--bogus"], "error: unknown option --bogus"),
    ]:
        proc = run_entry(repo_root, args, {})
        assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1


def test_finished_job_is_not_rerun_when_the_container_restarts(repo_root: Path, tmp_path: Path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "DONE").touch()
    proc = run_entry(repo_root, ["--root", str(tmp_path)], {})
    assert proc.returncode == 0 and "DONE exists: nothing to do" in proc.stdout


def test_failed_step_marks_the_job_failed_with_its_log(repo_root: Path, tmp_path: Path):
    # a dataset folder whose manifest is broken: reused, then training fails for real
    data = tmp_path / "dataset_all_4mm"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    # extra train args arrive base64-encoded, as the launcher sends values it cannot pass verbatim
    encoded = base64.b64encode(b"--use_mlflow false").decode()
    proc = run_entry(repo_root, ["--root", str(tmp_path), "--preset", "cpu"], {"CBVAE_B64_CBVAE_TRAIN_ARGS": encoded})
    out = tmp_path / "output"
    assert proc.returncode != 0 and (out / "FAILED").exists() and not (out / "DONE").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == "train_cbvae"
    assert "see logs/train_cbvae.log" in status["message"]
    assert (out / "logs" / "train_cbvae.log").stat().st_size > 0
    assert "reusing dataset" in proc.stdout and "--use_mlflow false" in proc.stdout
    assert not (out / "runs" / "baseline").exists()  # stopped at the first failure


@pytest.mark.slow
def test_entry_script_end_to_end_on_cpu(repo_root: Path, tmp_path: Path, tiny_dataset: Path):
    (tmp_path / "dataset_120_4mm").symlink_to(tiny_dataset, target_is_directory=True)
    train_args = "--use_mlflow false --epoch_length 2 --val_epoch_length 1 --batch_size 4 --progress false"
    env = {"CBVAE_TRAIN_ARGS": train_args, "CBVAE_EVAL_ARGS": "--n_bootstrap 20 --n_permutations 5"}
    proc = run_entry(repo_root, ["--root", str(tmp_path), "--subset", "120", "--epochs", "1"], env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "output"
    assert (out / "DONE").exists() and json.loads((out / "status.json").read_text())["state"] == "done"
    for name in ("cbvae", "baseline"):
        assert (out / "runs" / name / "decoder.ts").stat().st_size > 0
        assert (out / "runs" / name / "model.pt").stat().st_size > 0
    results = json.loads((out / "eval" / "test_results.json").read_text())
    assert results["split"] == "test" and results["n_test"] > 0 and {"cbvae", "baseline"} <= set(results["models"])
    assert [p.name for p in sorted((out / "logs").iterdir())] == [
        "check_decoder.log", "evaluate.log", "train_baseline.log", "train_cbvae.log"]  # fmt: skip
