"""The pod's self-removal (cbvae_ext.cloud.pod_deadline) against the stub, with the pod's own scoped key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from runpod_stub import RunPodStub

from cbvae_ext.cloud.pod_deadline import SelfRemovalError, remove_this_pod, wait_until

ACCOUNT_KEY = "rpa_ACCOUNT0123456789abcdef"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    with RunPodStub(ACCOUNT_KEY, faults=getattr(request, "param", None)) as server:
        server.pods["stubpod1"] = {"input": {"name": "x"}, "desiredStatus": "RUNNING", "polls": 0, "env": {}}
        server.pods["stubpod2"] = {"input": {"name": "y"}, "desiredStatus": "RUNNING", "polls": 0, "env": {}}
        monkeypatch.setenv("RUNPOD_API_BASE_URL", server.url)
        yield server


def test_only_its_own_pod_is_removed_with_its_own_key(stub: RunPodStub):
    lines: list[str] = []
    assert remove_this_pod(stub.platform_env("stubpod1"), say=lines.append)
    assert stub.alive() == ["stubpod2"] and [r.pod_scoped for r in stub.ops("podTerminate")] == [True]
    assert lines == ["[cbvae] pod stubpod1 removed"]


def test_a_machine_that_is_not_a_pod_cannot_remove_itself(stub: RunPodStub):
    with pytest.raises(SelfRemovalError, match="RUNPOD_POD_ID and RUNPOD_API_KEY must be set"):
        remove_this_pod({"RUNPOD_POD_ID": "stubpod1"})
    assert stub.requests == []


@pytest.mark.parametrize("stub", [{"terminate_errors": 2}], indirect=True)
def test_failed_removal_is_retried_with_back_off(stub: RunPodStub):
    pauses: list[float] = []
    lines: list[str] = []
    assert remove_this_pod(stub.platform_env("stubpod1"), retry_s=1.0, sleep=pauses.append, say=lines.append)
    assert pauses == [1.0, 2.0] and len(stub.ops("podTerminate")) == 3 and "stubpod1" not in stub.alive()
    assert not any("pod-scoped" in line for line in lines)  # the key is never said


@pytest.mark.parametrize("stub", [{"terminate_errors": 99}], indirect=True)
def test_runpodctl_is_the_fallback_when_the_api_keeps_failing(stub: RunPodStub, tmp_path: Path, monkeypatch):
    calls = tmp_path / "calls"
    ctl = tmp_path / "runpodctl"
    ctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    ctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    assert remove_this_pod(stub.platform_env("stubpod1"), attempts=2, sleep=lambda s: None, say=lines.append)
    assert calls.read_text() == "remove pod stubpod1\n" and lines[-1] == "[cbvae] pod stubpod1 removed with runpodctl"


def test_wait_until_sleeps_in_steps_until_the_deadline():
    now = [100.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    wait_until(250.5, clock=lambda: now[0], sleep=sleep)
    assert pauses == [60.0, 60.0, 30.5] and now[0] == 250.5


@pytest.mark.parametrize("until", ["inf", "nan", "0"])
def test_cli_refuses_a_deadline_that_never_fires(until: str):
    proc = subprocess.run(
        [sys.executable, "-m", "cbvae_ext.cloud.pod_deadline", "watch", "--until", until],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "--until must be a Unix time" in proc.stderr
