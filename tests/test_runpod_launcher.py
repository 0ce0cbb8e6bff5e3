"""Pod lifecycle against the local RunPod GraphQL stub, through the real RunPod SDK.

Time is simulated (``sleep`` advances a fake clock) so polls, start timeouts and cost caps run instantly;
the "pod" file system is a local folder that the status reader and the transfer step read for real.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from runpod_stub import RunPodStub

from cbvae_ext.cloud import (
    CostCapReached,
    GraphQLValueError,
    LaunchConfig,
    LaunchError,
    LaunchInterrupted,
    PodLauncher,
    PodStartTimeout,
    Secrets,
    SecretsError,
    TrainingFailed,
    TransferError,
)
from cbvae_ext.cloud.launcher import LaunchConfigError
from cbvae_ext.cloud.pod_deadline import SelfRemovalError
from cbvae_ext.errors import CbvaeError

RUNPOD_KEY = "rpa_TESTKEY0123456789abcdefSECRET"
WANDB_KEY = "0123456789abcdef0123456789abcdefWANDBKEY"


class FakeClock:
    """Monotonic clock advanced only by ``sleep``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class PodFiles:
    """The pod's file system as a local folder: status reader and transfer read it like SSH would."""

    def __init__(self, root: Path, remote_output: str, states: list[dict]) -> None:
        self.output = root / remote_output.lstrip("/")
        self.output.mkdir(parents=True)
        self.states = list(states)
        self.reads = 0

    def read_status(self, endpoint, remote_dir: str) -> dict | None:
        self.reads += 1
        if self.states:  # the job advances one state per poll
            (self.output / "status.json").write_text(json.dumps(self.states.pop(0)))
        path = self.output / "status.json"
        return json.loads(path.read_text()) if path.exists() else None

    def transfer(self, endpoint, remote_dir: str, local_dir: Path) -> Path:
        assert endpoint.host == "127.0.0.1" and endpoint.port == 22022
        shutil.copytree(self.output, local_dir, dirs_exist_ok=True)
        return local_dir


DONE = [{"state": "running", "step": "dataset"}, {"state": "running", "step": "train_cbvae"}, {"state": "done"}]


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    faults = getattr(request, "param", None)
    with RunPodStub(RUNPOD_KEY, start_polls=2, faults=faults) as server:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", server.url)
        yield server


def make(tmp_path: Path, states=DONE, transfer=None, status_reader=None, **options):
    clock = FakeClock()
    options = {"poll_s": 60, "start_timeout_s": 600, "retry_s": 1, **options}
    config = LaunchConfig(image="ghcr.io/test/cbvae:1", local_dir=tmp_path / "download", **options)
    pod = PodFiles(tmp_path / "pod", config.remote_output, states)
    (pod.output / "cbvae").mkdir(parents=True)
    (pod.output / "cbvae" / "decoder.ts").write_bytes(b"decoder")
    launcher = PodLauncher(
        config,
        Secrets(runpod_api_key=RUNPOD_KEY, wandb_api_key=WANDB_KEY),
        transfer=transfer or pod.transfer,
        status_reader=status_reader or pod.read_status,
        sleep=clock.sleep,
        clock=clock,
    )
    return launcher, pod, clock


def test_happy_path_creates_follows_downloads_and_terminates_once(stub: RunPodStub, tmp_path: Path, capsys):
    launcher, pod, clock = make(tmp_path, epochs=50)
    result = launcher.run()

    ops = [r.operation for r in stub.requests]
    assert ops[0] == "gpuTypes" and "podFindAndDeployOnDemand" in ops and ops[-1] == "podTerminate"
    assert ops.count("podFindAndDeployOnDemand") == 1 and ops.count("podTerminate") == 1
    assert stub.alive() == []
    assert result.terminated and result.pod_id == "stubpod1" and result.status == {"state": "done"}
    assert (tmp_path / "download" / "cbvae" / "decoder.ts").read_bytes() == b"decoder"
    # SSH port shown at the 3rd pod poll (2 pauses), then one pause per unfinished job state (2)
    assert clock.sleeps == [60.0] * 4
    assert result.price_per_hour == 0.69 and result.hours == pytest.approx(240 / 3600)
    assert result.cost == pytest.approx(0.69 * 240 / 3600)

    create = stub.ops("podFindAndDeployOnDemand")[0].arguments["input"]
    assert create["gpuTypeId"] == "NVIDIA GeForce RTX 4090" and create["cloudType"] == "SECURE"
    assert create["ports"] == "22/tcp" and create["volumeInGb"] == 60 and create["startSsh"] is True
    env = {e["key"]: e["value"] for e in create["env"]}
    assert env["CBVAE_EPOCHS"] == "50" and env["CBVAE_KEEP_ALIVE"] == "1" and env["WANDB_API_KEY"] == WANDB_KEY
    assert stub.ops("podTerminate")[0].arguments["input"] == {"podId": "stubpod1"}

    out = capsys.readouterr().out
    assert "$0.690/h" in out and "final cost about $0.05" in out and "pod stubpod1 terminated" in out
    assert RUNPOD_KEY not in out and WANDB_KEY not in out


def test_create_error_leaves_no_pod_and_sends_no_terminate(monkeypatch, tmp_path: Path):
    with RunPodStub(RUNPOD_KEY, faults={"create_error": True}) as stub:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", stub.url)
        launcher, _, _ = make(tmp_path)
        with pytest.raises(Exception, match="no longer any instances"):
            launcher.run()
    # nothing was created, so there is nothing to terminate; the lookup by name found no pod
    assert stub.pods == {} and stub.ops("podTerminate") == [] and len(stub.ops("myself")) == 1


@pytest.mark.parametrize(
    ("faults", "error"),
    [
        ({"create_lost": True}, Exception),  # pod created, reply lost: found by its unique name
        ({"pod_error": True}, LaunchError),  # API errors while polling
        ({"pod_lost": True}, LaunchError),  # connection drops while polling
        ({"never_running": True}, PodStartTimeout),
    ],
    ids=["create_lost", "pod_api_error", "pod_connection_lost", "never_running"],
)
def test_api_failures_still_terminate_exactly_once(monkeypatch, tmp_path: Path, faults, error):
    with RunPodStub(RUNPOD_KEY, faults=faults) as stub:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", stub.url)
        launcher, _, clock = make(tmp_path)
        with pytest.raises(error):
            launcher.run()
    assert len(stub.pods) == 1 and stub.alive() == []
    assert [r.arguments["input"]["podId"] for r in stub.ops("podTerminate")] == ["stubpod1"]
    assert launcher.result.terminated
    if "never_running" in faults:
        assert 600 < clock.now - 1000.0 <= 660  # gave up right after the start timeout


def _raise_transfer_error(endpoint, remote_dir, local_dir):
    raise TransferError("rsync failed: connection reset")


def _sigint(endpoint, remote_dir):
    signal.raise_signal(signal.SIGINT)  # a real Ctrl-C


def _sigterm(endpoint, remote_dir, local_dir):
    signal.raise_signal(signal.SIGTERM)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"transfer": _raise_transfer_error}, TransferError),
        ({"status_reader": _sigint}, KeyboardInterrupt),
        ({"transfer": _sigterm}, LaunchInterrupted),
        ({"states": [{"state": "running", "step": "train_cbvae"}], "max_hours": 0.1}, CostCapReached),
    ],
    ids=["transfer_fails", "ctrl_c", "sigterm", "max_hours"],
)
def test_job_failures_still_terminate_exactly_once(stub: RunPodStub, tmp_path: Path, kwargs, error):
    previous = signal.getsignal(signal.SIGTERM)
    launcher, _, clock = make(tmp_path, **kwargs)
    with pytest.raises(error):
        launcher.run()
    assert len(stub.ops("podTerminate")) == 1 and stub.alive() == [] and launcher.result.terminated
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    if "max_hours" in kwargs:
        assert clock.now - 1000.0 == pytest.approx(360.0)  # the last pause was cut to end exactly at the cap


def test_failed_training_downloads_logs_and_terminates(stub: RunPodStub, tmp_path: Path):
    states = [{"state": "running", "step": "train_cbvae"}, {"state": "failed", "step": "train_cbvae", "message": "OOM"}]
    launcher, pod, _ = make(tmp_path, states=states)
    (pod.output / "logs").mkdir()
    (pod.output / "logs" / "train_cbvae.log").write_text("CUDA out of memory")
    with pytest.raises(TrainingFailed, match="'train_cbvae': OOM"):
        launcher.run()
    assert (tmp_path / "download" / "logs" / "train_cbvae.log").read_text() == "CUDA out of memory"
    assert len(stub.ops("podTerminate")) == 1


def test_cost_cap_terminates_a_pod_that_runs_too_long(stub: RunPodStub, tmp_path: Path, capsys):
    # $0.69/h and a $0.05 cap: the cap is reached after 0.05 / 0.69 h = 260.9 s of pod time
    launcher, pod, clock = make(tmp_path, states=[{"state": "running", "step": "train_cbvae"}], max_cost=0.05)
    with pytest.raises(CostCapReached, match=r"--max-cost \$0.05 reached"):
        launcher.run()
    assert clock.now - 1000.0 == pytest.approx(0.05 / 0.69 * 3600)
    assert launcher.result.cost == pytest.approx(0.05)
    assert len(stub.ops("podTerminate")) == 1 and stub.alive() == []
    assert not (tmp_path / "download").exists()  # capped: no download on the pod's time
    assert "final cost about $0.05" in capsys.readouterr().out


@pytest.mark.parametrize("stub", [{"terminate_errors": 2}], indirect=True)
def test_terminate_is_retried_only_when_it_fails(stub: RunPodStub, tmp_path: Path):
    launcher, _, clock = make(tmp_path)
    launcher.run()
    assert len(stub.ops("podTerminate")) == 3 and stub.alive() == []
    assert clock.sleeps[-2:] == [1.0, 2.0]  # back-off between attempts


@pytest.mark.parametrize("stub", [{"terminate_errors": 99}], indirect=True)
def test_unterminated_pod_is_an_error_naming_the_manual_fix(stub: RunPodStub, tmp_path: Path, capsys):
    launcher, _, _ = make(tmp_path)
    with pytest.raises(LaunchError, match="could not be terminated"):
        launcher.run()
    assert len(stub.ops("podTerminate")) == 3 and stub.alive() == ["stubpod1"]
    assert "train_runpod.py --terminate stubpod1" in capsys.readouterr().out


def test_unknown_gpu_fails_before_creating_a_pod(stub: RunPodStub, tmp_path: Path):
    launcher, _, _ = make(tmp_path, gpu="NVIDIA Imaginary 9000")
    with pytest.raises(ValueError, match="No GPU found"):
        launcher.run()
    assert stub.pods == {} and [r.operation for r in stub.requests] == ["gpuTypes"]


def test_pod_env_carries_the_deadline_of_the_tighter_cap(stub: RunPodStub, tmp_path: Path):
    # $0.69/h: --max-cost 0.69 is one hour, tighter than --max-hours 6
    launcher, _, _ = make(tmp_path, max_cost=0.69)
    launcher.wall_clock = lambda: 1_700_000_000.0
    launcher.run()
    env = {e["key"]: e["value"] for e in stub.ops("podFindAndDeployOnDemand")[0].arguments["input"]["env"]}
    assert env["CBVAE_DEADLINE"] == str(1_700_000_000 + 3600) and launcher.result.deadline == 1_700_003_600.0


@pytest.mark.parametrize(
    "signum", [signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP], ids=["sigquit", "sigusr1", "sighup"]
)
def test_ending_signals_terminate_the_pod(stub: RunPodStub, tmp_path: Path, signum: signal.Signals):
    previous = signal.getsignal(signum)

    def status_reader(endpoint, remote_dir):
        signal.raise_signal(signum)

    launcher, _, _ = make(tmp_path, status_reader=status_reader)
    with pytest.raises(LaunchInterrupted, match=signum.name) as err:
        launcher.run()
    assert err.value.signum == signum  # the CLI exits 128 + signum
    assert len(stub.ops("podTerminate")) == 1 and stub.alive() == [] and launcher.result.terminated
    assert signal.getsignal(signum) is previous


def _press_during(
    stub: RunPodStub, operation: str, signum: signal.Signals, pauses: tuple[float, ...]
) -> threading.Thread:
    """Send ``signum`` to the main thread ``pauses`` seconds apart, starting once ``operation`` reached the stub."""

    def press() -> None:
        while not stub.ops(operation):
            time.sleep(0.02)
        for pause in pauses:
            time.sleep(pause)
            signal.pthread_kill(threading.main_thread().ident, signum)  # as Ctrl-C or kill reaches it

    presser = threading.Thread(target=press)
    presser.start()
    return presser


def test_ctrl_c_during_a_slow_create_waits_for_the_pod_and_terminates_it(monkeypatch, tmp_path: Path, capsys):
    # the API takes 1.5 s to create the pod; two Ctrl-C 0.2 and 0.7 s into the request are held until it answers
    # (raised inside requests, an exception can leave its locks held), so the pod's id is known: no lookup by name
    with RunPodStub(RUNPOD_KEY, faults={"create_delay": 1.5}) as stub:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", stub.url)
        # a 2-minute cap: if a loaded machine delivers the presses after the create, fail instead of hanging
        config = LaunchConfig(
            image="img", local_dir=tmp_path / "d", retry_s=0.2, lookup_s=10, poll_s=60, max_hours=120 / 3600
        )
        launcher = PodLauncher(config, Secrets(runpod_api_key=RUNPOD_KEY))
        presser = _press_during(stub, "podFindAndDeployOnDemand", signal.SIGINT, (0.2, 0.5))
        with pytest.raises(KeyboardInterrupt):
            launcher.run()
        presser.join()
        alive = stub.alive()
    out = capsys.readouterr().out
    assert len(stub.pods) == 1 and alive == [] and stub.ops("pod") == []  # stopped before following it
    assert [r.arguments["input"]["podId"] for r in stub.ops("podTerminate")] == ["stubpod1"]
    assert launcher.result.leftover() == "pod stubpod1 terminated"
    assert "SIGINT arrived during a RunPod API call: stopping now that it has answered" in out
    assert "looking for pod" not in out and stub.ops("myself") == []


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["sigusr1", "ctrl_c"])
def test_a_signal_during_a_pod_query_ends_the_launch_not_the_query(monkeypatch, tmp_path: Path, capsys, signum):
    # on a loaded machine SIGUSR1 landed inside the SDK's ``pod`` query, which then counted as a failed API call
    # ("retrying") and the launcher hung; now the query finishes and the launch ends at once
    with RunPodStub(RUNPOD_KEY, start_polls=0, faults={"pod_delay": 1.0}) as stub:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", stub.url)
        launcher, _, _ = make(tmp_path, max_hours=120 / 3600)
        presser = _press_during(stub, "pod", signum, (0.3,))
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else LaunchInterrupted):
            launcher.run()
        presser.join()
        alive = stub.alive()
    out = capsys.readouterr().out
    assert alive == [] and len(stub.ops("podTerminate")) == 1 and len(stub.ops("pod")) == 1
    assert "API call failed" not in out
    assert f"{signum.name} arrived during a RunPod API call: stopping now that it has answered" in out


def test_a_pod_that_removed_itself_counts_as_terminated(monkeypatch, tmp_path: Path, capsys):
    # the pod reached its own deadline first; its terminate then fails, but nothing is left running
    with RunPodStub(RUNPOD_KEY, start_polls=0, faults={"terminate_errors": 99}) as stub:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", stub.url)

        def self_removed(endpoint, remote_dir):
            stub.pods["stubpod1"]["desiredStatus"] = "TERMINATED"

        launcher, _, _ = make(tmp_path, status_reader=self_removed)
        with pytest.raises(LaunchError, match="no longer exists"):
            launcher.run()
    assert launcher.result.terminated and "is gone (it removed itself" in capsys.readouterr().out


@pytest.mark.parametrize(
    "error", [LaunchError, LaunchConfigError, SecretsError, GraphQLValueError, TransferError, SelfRemovalError]
)
def test_cloud_errors_are_cbvae_errors_and_keep_their_builtin_base(error):
    assert issubclass(error, CbvaeError)
    assert issubclass(error, ValueError) or issubclass(error, RuntimeError)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"max_hours": float("inf")}, "--max-hours must be a finite number > 0"),
        ({"max_cost": float("inf")}, "--max-cost must be a finite number > 0"),
        ({"poll_s": 0}, "--poll-s must be >= 1"),
        ({"extra_env": {"CBVAE_ROOT": "/elsewhere"}}, "--env CBVAE_ROOT: the launcher sets it; use --remote-root"),
        ({"extra_env": {"CBVAE_DEADLINE": "9999999999"}}, "--env CBVAE_DEADLINE: the launcher sets it"),
        ({"extra_env": {"RUNPOD_POD_ID": "someone-else"}}, "--env RUNPOD_POD_ID: RunPod sets RUNPOD_"),
        ({"extra_env": {"CBVAE_B64_CBVAE_ROOT": "L3g="}}, "--env CBVAE_B64_CBVAE_ROOT: CBVAE_B64_"),
        ({"extra_env": {"NOTE": f"use {WANDB_KEY} here"}}, "--env NOTE: its value holds an API key"),
    ],
)
def test_bad_launch_options_are_refused_before_any_request(stub: RunPodStub, tmp_path: Path, option, message):
    launcher, _, _ = make(tmp_path, **option)
    with pytest.raises(LaunchConfigError, match=re.escape(message)) as info:
        launcher.run()
    assert WANDB_KEY not in str(info.value) and stub.requests == []
    with pytest.raises(LaunchConfigError):
        launcher.plan()
