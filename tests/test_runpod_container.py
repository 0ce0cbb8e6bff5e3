"""The container: a static check of the Dockerfile (no Docker daemon here) and the entry script run for real."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NEUROQUERY_DIR, TINY_TERM_DIMS
from runpod_stub import RunPodStub

from cbvae_ext.cloud.launcher import POD_VALUES, LaunchConfig, LaunchConfigError

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
    for name in ("WANDB_API_KEY", "RUNPOD_API_KEY", "RUNPOD_POD_ID", "CBVAE_NEUROSYNTH_DIR"):
        if name not in env:
            full.pop(name, None)
    script = repo_root / "scripts" / "runpod_train.sh"
    return subprocess.run([str(script), *args], env=full, capture_output=True, text=True, timeout=timeout)


def test_entry_script_help_and_bad_arguments(repo_root: Path, tmp_path: Path):
    for script in ("runpod_train.sh", "run_main.sh"):
        assert subprocess.run(["bash", "-n", str(repo_root / "scripts" / script)]).returncode == 0
        assert os.access(repo_root / "scripts" / script, os.X_OK)
    help_ = run_entry(repo_root, ["--help"], {})
    assert help_.returncode == 0 and "status.json" in help_.stdout and "--subset" in help_.stdout
    assert "--deadline" in help_.stdout and "--kernel-fwhm" in help_.stdout
    for args, message in [
        (["--epochs", "0"], "error: --epochs must be a positive integer, got '0'"),
        (["--subset", "ten"], "error: --subset must be a positive integer or all"),
        (["--kernel-fwhm", "wide"], "error: --kernel-fwhm must be a number of mm, got 'wide'"),
        (["--neurosynth-dir", "/no/such/dir"], "error: --neurosynth-dir /no/such/dir does not exist"),
        (["--deadline", "soon"], "error: --deadline must be a Unix time in seconds, got 'soon'"),
        (["--networks", "baseline"], "error: --networks must be a comma-separated list of cbvae, baseline, uncond"),
        (["--bogus"], "error: unknown option --bogus"),
    ]:
        proc = run_entry(repo_root, ["--root", str(tmp_path), *args], {})
        assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    # a refused option still tells the launcher: the job failed
    assert json.loads((tmp_path / "output" / "status.json").read_text())["state"] == "failed"


def test_finished_job_is_not_rerun_when_the_container_restarts(repo_root: Path, tmp_path: Path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "DONE").touch()
    proc = run_entry(repo_root, ["--root", str(tmp_path)], {})
    assert proc.returncode == 0 and "DONE exists: nothing to do" in proc.stdout


def test_the_builder_always_runs_with_the_build_options(repo_root: Path, tmp_path: Path):
    """A dataset already on the volume is never reused blindly: the builder (and its cache key) decides."""
    for name in ("dataset", "dataset_50_2mm"):  # the dataset folder, by today's name and by the old one
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    empty = tmp_path / "ns copy"  # a space: sent base64-encoded by the launcher, decoded by the entry script
    empty.mkdir()
    env = {
        "CBVAE_B64_CBVAE_NEUROSYNTH_DIR": base64.b64encode(str(empty).encode()).decode(),
        "CBVAE_KERNEL_FWHM": "12",
        "CBVAE_RESOLUTION": "2",
    }
    proc = run_entry(repo_root, ["--root", str(tmp_path), "--subset", "50"], env)
    out = tmp_path / "output"
    assert proc.returncode != 0 and (out / "FAILED").exists() and not (out / "DONE").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == "dataset", status
    assert "see logs/dataset.log" in status["message"]
    assert (out / "logs" / "dataset.log").read_text().startswith("error: ")  # the builder judged the stale folder
    dataset_line = next((line for line in proc.stdout.splitlines() if line.startswith("[main] dataset:")), "")
    for option in ("--resolution 2", "--kernel ale", "--kernel-fwhm 12", f"--neurosynth-dir {empty}", "--subset 50"):
        assert option in dataset_line, dataset_line
    assert "reusing" not in proc.stdout and not (out / "cbvae").exists()  # stopped at the first failure


SLOW_DATASET = """#!/bin/sh
# the real interpreter, except that the dataset build takes a minute
case " $* " in *" cbvae_ext.data "*) sleep 60 ;; esac
exec {python} "$@"
"""


@pytest.fixture
def pod(monkeypatch: pytest.MonkeyPatch):
    """A stub RunPod API holding one running pod, and the environment RunPod gives that pod."""
    with RunPodStub("rpa_ACCOUNTKEY0123456789") as stub:
        stub.pods["stubpod1"] = {"input": {"name": "cbvae-x"}, "desiredStatus": "RUNNING", "polls": 0, "env": {}}
        yield stub, {**stub.platform_env("stubpod1"), "RUNPOD_API_BASE_URL": stub.url}


def wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_pod_removes_itself_at_the_deadline_while_the_job_still_runs(repo_root: Path, tmp_path: Path, pod):
    stub, pod_env = pod
    slow = tmp_path / "python"
    slow.write_text(SLOW_DATASET.format(python=sys.executable))
    slow.chmod(0o755)
    deadline = int(time.time()) + 5
    env = {**os.environ, **pod_env, "PYTHON": str(slow), "CBVAE_DEADLINE": str(deadline), "CBVAE_KEEP_ALIVE": "1"}
    script = repo_root / "scripts" / "runpod_train.sh"
    with subprocess.Popen(
        [str(script), "--root", str(tmp_path / "root"), "--subset", "50", "--epochs", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            removed = wait_for(lambda: stub.alive() == [], timeout=40)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the container goes with its pod
        log = proc.stdout.read()
    assert removed, log
    terminate = stub.ops("podTerminate")
    assert len(terminate) == 1 and terminate[0].arguments["input"] == {"podId": "stubpod1"}
    assert terminate[0].pod_scoped  # with the pod's own key, not the account's
    assert not (tmp_path / "root" / "output" / "DONE").exists()  # removed mid-job
    assert time.time() >= deadline and "removing this pod: deadline reached" in log


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_pod_removes_itself_after_the_job_and_the_linger(repo_root: Path, tmp_path: Path, pod, outcome):
    stub, pod_env = pod
    out = tmp_path / "output"
    args = ["--root", str(tmp_path), "--keep-alive"]
    if outcome == "done":
        out.mkdir()
        (out / "DONE").touch()
    else:
        args += ["--neurosynth-dir", str(tmp_path)]  # no Neurosynth files there: the dataset step fails
    started = time.time()
    env = {**pod_env, "CBVAE_DEADLINE": str(int(started) + 3600), "CBVAE_LINGER_S": "1"}
    proc = run_entry(repo_root, args, env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # it exits once its pod is gone
    assert stub.alive() == [] and [r.pod_scoped for r in stub.ops("podTerminate")] == [True]
    assert f"job ended (exit {0 if outcome == 'done' else 2})" in proc.stdout
    assert (out / ("DONE" if outcome == "done" else "FAILED")).exists()
    assert "rpa_ACCOUNTKEY" not in proc.stdout + proc.stderr and "pod-scoped" not in proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_entry_script_end_to_end_on_cpu(repo_root: Path, tmp_path: Path, tiny_dataset: Path, neurosynth_dir: Path):
    # a copy of the tiny dataset with its own build options: the builder finds the same cache key and reuses it
    # (a copy, so that its lock never meets another test's builder on the shared dataset)
    shutil.copytree(tiny_dataset, tmp_path / "dataset")
    # a tiny network and a short evaluation: the pipeline's wiring on a real run (run_main.sh splits on spaces)
    train_args = "--use_mlflow false --epoch_length 2 --val_epoch_length 1 --batch_size 4 --progress false"
    train_args += " --network_overrides {'channels':[4,8],'block_layers':[1],'growth_rate':4}"
    env = {
        "CBVAE_TRAIN_ARGS": train_args,
        # gpu_check.sh --tiny's evaluation sizes, without the NeuroQuery fits (42 of the evaluation's 92 s here;
        # gpu_check's test runs them through run_main.sh, test_eval_bundle checks them)
        "CBVAE_EVAL_ARGS": "--n_bootstrap 20 --n_permutations 5 --iwae_k 2 --n_prior_samples 2 --n_counterfactual 1 "
        "--max_train_maps 100 --n_half_splits 1 --joint_k 2 --n_calibration_samples 2 --decoding_k 1 "
        "--decoding_n_terms 5 --decoding_max_maps 6 --qc_k 1 --qc_max_maps 6 --n_unseen_pairs 0 --neuroquery false",
        "CBVAE_NEUROQUERY_DIR": str(NEUROQUERY_DIR),  # the tiny dataset's terms came from there
        "CBVAE_TERM_DIMS": str(TINY_TERM_DIMS),  # and its terms condition
        # the model alone (about 20 s a training): gpu_check's test already runs all four through run_main.sh
        "CBVAE_NETWORKS": "cbvae",
    }
    args = ["--root", str(tmp_path), "--subset", "120", "--epochs", "1", "--neurosynth-dir", str(neurosynth_dir)]
    proc = run_entry(repo_root, args, env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "output"
    assert (out / "DONE").exists() and json.loads((out / "status.json").read_text())["state"] == "done"
    assert "reusing" in (out / "logs" / "dataset.log").read_text()
    assert (out / "cbvae" / "decoder.ts").stat().st_size > 0 and (out / "cbvae" / "model.pt").stat().st_size > 0
    results = json.loads((out / "eval" / "test_results.json").read_text())
    assert results["split"] == "test" and results["n_test"] > 0 and "cbvae" in results["models"]
    for name in ("baseline", "uncond", "nolambda"):  # --networks chose one
        assert not (out / name).exists() and not (out / "logs" / f"train_{name}.log").exists()
    steps = {p.stem for p in (out / "logs").iterdir()}
    assert {"dataset", "train_cbvae", "check_decoder", "evaluate"} <= steps


def _pid_namespaces_work() -> bool:
    """A new PID namespace (as a container's) needs root or user namespaces; skip where neither exists."""
    try:
        probe = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "test $$ = 1"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_pid_namespace = pytest.mark.skipif(not _pid_namespaces_work(), reason="unshare --pid is not permitted here")


def run_as_pid1(repo_root: Path, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """The entry script as PID 1 of a new PID namespace, as a container runs it: its exit kills every process
    it started (a background watchdog included). Returns the process and its run time in seconds."""
    full = {**os.environ, "PYTHON": sys.executable, **env}
    command = ["unshare", "--pid", "--fork", "--mount-proc", str(repo_root / "scripts" / "runpod_train.sh"), *args]
    started = time.monotonic()
    proc = subprocess.run(command, env=full, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - started


@needs_pid_namespace
@pytest.mark.parametrize("case", ["bad_linger", "set_e_exit", "job_fails_early"])
def test_pod_is_removed_when_the_entry_script_as_pid1_exits_early(repo_root: Path, tmp_path: Path, pod, case: str):
    """An exit of PID 1 kills the deadline watchdog, and RunPod restarts the container: every early exit of a
    pod with a deadline must remove the pod itself, at once (not an hour later, not never)."""
    stub, pod_env = pod
    env = {**pod_env, "CBVAE_DEADLINE": str(int(time.time()) + 3600)}
    if case == "bad_linger":  # refused before the watchdog starts
        args, env["CBVAE_LINGER_S"], said = ["--root", str(tmp_path), "--keep-alive"], "10m", "error: --linger must"
    elif case == "set_e_exit":  # a `set -e` failure after the watchdog started: the output folder cannot be made
        (tmp_path / "root").write_text("a file, not a folder")
        args, said = ["--root", str(tmp_path / "root"), "--keep-alive"], "mkdir: cannot create directory"
    else:  # the job refuses its options and the script ends without --keep-alive
        args, said = ["--root", str(tmp_path), "--neurosynth-dir", "/no/such/dir"], "error: --neurosynth-dir"
    proc, seconds = run_as_pid1(repo_root, args, env)
    assert proc.returncode in (1, 2) and said in proc.stderr, proc.stdout + proc.stderr
    terminate = stub.ops("podTerminate")
    assert [r.pod_scoped for r in terminate] == [True] and stub.alive() == [], proc.stdout + proc.stderr
    assert terminate[0].arguments["input"] == {"podId": "stubpod1"}
    assert seconds < 30 and "removing this pod: entry script ended" in proc.stdout  # ~3 s here
    assert "pod-scoped" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@needs_pid_namespace
def test_pod_keys_never_reach_the_process_list_or_the_output(repo_root: Path, tmp_path: Path, pod):
    """While the pod lingers and removes itself, `ps` shows no key (they travel in the environment only)."""
    stub, pod_env = pod
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "DONE").touch()
    env = {**os.environ, **pod_env, "PYTHON": sys.executable, "CBVAE_DEADLINE": str(int(time.time()) + 3600)}
    env.update(CBVAE_LINGER_S="4", WANDB_API_KEY="wandbSECRET0123456789abcdef0123456789")
    command = ["unshare", "--pid", "--fork", "--mount-proc", str(repo_root / "scripts" / "runpod_train.sh")]
    listings = []
    with subprocess.Popen(
        [*command, "--root", str(tmp_path), "--keep-alive"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    ) as proc:  # fmt: skip
        while proc.poll() is None:
            listings.append(subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True).stdout)
            time.sleep(0.2)
        log = proc.stdout.read()
    assert proc.returncode == 0 and stub.alive() == [], log
    assert any("cbvae_ext.cloud.pod_deadline watch" in listing for listing in listings)  # the listing saw it
    for text in (*listings, log):
        assert "pod-scoped" not in text and "wandbSECRET" not in text


@pytest.mark.parametrize("name", sorted(POD_VALUES))
def test_launcher_refuses_exactly_the_values_the_pod_refuses(repo_root: Path, tmp_path: Path, name: str):
    """POD_VALUES (the launcher's copy of the pod's rules) against the real scripts, value by value."""
    script = repo_root / "scripts" / "runpod_train.sh"
    env = {**os.environ, "PYTHON": "true"}  # the job-status writer is not needed here
    for value in ("0", "1", "2", "4", "09", "-5", "10m", "1e3", "12.5", "all", "gpu", "mkda", "999999", "1000000"):
        # a bad --neurosynth-dir, checked last: a value passed means the pipeline got as far as that check
        proc = subprocess.run(
            [str(script), "--root", str(tmp_path), "--neurosynth-dir", "/no/such/dir"],
            env={**env, name: value}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        pod_accepts = proc.stderr.startswith("error: --neurosynth-dir")
        config = LaunchConfig(image="img", extra_env={name: value})
        try:
            config.check_pod_values()
            launcher_accepts = True
        except LaunchConfigError:
            launcher_accepts = False
        assert launcher_accepts == pod_accepts, (name, value, proc.stderr)
