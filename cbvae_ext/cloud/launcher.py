"""Pod lifecycle: create a RunPod GPU pod, follow training, download the outputs, and always terminate it.

Every exit path (success, API error, pod never starting, failed training or transfer, cost or time cap,
Ctrl-C, SIGTERM/SIGHUP/SIGQUIT/SIGUSR1, lost connection) leaves through one ``finally`` that finds a pod
whose create reply was lost and sends ``podTerminate`` exactly once (retried only if that call itself
fails), with further signals deferred while it runs. What no handler can catch (``kill -9``, a dead
machine) is bounded by the pod itself: it removes itself at ``CBVAE_DEADLINE``
(:mod:`cbvae_ext.cloud.pod_deadline`), the same cap the launcher enforces.
All API calls go through the RunPod Python SDK (``runpod.create_pod``, ``get_pod``, ``terminate_pod``,
``get_gpu``), which honours ``RUNPOD_API_BASE_URL``; every value it pastes into GraphQL is checked by
:mod:`cbvae_ext.cloud.graphql_safety` first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets as _random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from cbvae_ext.cloud.graphql_safety import B64_PREFIX, check_value, decode_env, encode_env
from cbvae_ext.cloud.secrets import RUNPOD_KEY_VAR, WANDB_KEY_VAR, Secrets
from cbvae_ext.cloud.transfer import SSHEndpoint, download_outputs, endpoint_from_pod, read_status
from cbvae_ext.errors import CbvaeError
from cbvae_ext.extras import require

__all__ = [
    "CLOUDS",
    "DEADLINE_VAR",
    "MAX_DISK_GB",
    "MIN_POLL_S",
    "POD_VALUES",
    "CostCapReached",
    "LaunchConfig",
    "LaunchConfigError",
    "LaunchError",
    "LaunchInterrupted",
    "LaunchResult",
    "PodLauncher",
    "PodStartTimeout",
    "TrainingFailed",
    "describe_pod",
    "gpu_price",
    "terminate_pod_by_id",
]

CLOUDS = ("SECURE", "COMMUNITY", "ALL")
_STOPPED = ("EXITED", "TERMINATED")
#: the pod's own deadline (Unix time), enforced on the pod by ``python -m cbvae_ext.cloud.pod_deadline``
DEADLINE_VAR = "CBVAE_DEADLINE"
#: shortest pause between status polls (each poll is one API query and one SSH login)
MIN_POLL_S = 1.0
#: largest volume or container disk accepted: no RunPod machine offers more (network volumes stop at 4 TB)
MAX_DISK_GB = 4000
#: what the entry script accepts in each variable it reads, as (pattern, in words, the launcher option that sets
#: it): a bad value is refused before any pod exists, as ``scripts/runpod_train.sh`` and ``scripts/run_main.sh``
#: would refuse it on the pod (tests/test_runpod_container.py runs them on the same values)
POD_VALUES: dict[str, tuple[str, str, str]] = {
    "CBVAE_EPOCHS": (r"[1-9][0-9]*", "a positive integer", "--epochs"),
    "CBVAE_SUBSET": (r"all|[1-9][0-9]*", "a positive integer or all", "--subset"),
    "CBVAE_PRESET": (r"gpu|cpu", "gpu or cpu", "--preset"),
    "CBVAE_RESOLUTION": (r"2|4", "2 or 4", "--env CBVAE_RESOLUTION"),
    "CBVAE_KERNEL": (r"ale|mkda", "ale or mkda", "--env CBVAE_KERNEL"),
    "CBVAE_KERNEL_FWHM": (r"[0-9]+([.][0-9]+)?", "a number of mm", "--env CBVAE_KERNEL_FWHM"),
    "CBVAE_LINGER_S": (r"0|[1-9][0-9]{0,5}", "whole seconds from 0 to 999999", "--env CBVAE_LINGER_S"),
}
#: pod variables the launcher sets itself, and the option that sets each (``--env`` may not override them)
_OWN_ENV = {
    "CBVAE_ROOT": "--remote-root",
    "CBVAE_EPOCHS": "--epochs",
    "CBVAE_SUBSET": "--subset",
    "CBVAE_PRESET": "--preset",
    "CBVAE_KEEP_ALIVE": "nothing (always 1: the pod stays up for the download)",
    DEADLINE_VAR: "--max-hours/--max-cost",
    "PUBLIC_KEY": "--ssh-key",
}
#: a value whose variable name holds one of these is shown as <redacted> in the plan
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")

log = logging.getLogger(__name__)

Transfer = Callable[[SSHEndpoint, str, Path], Any]
StatusReader = Callable[[SSHEndpoint, str], "dict[str, Any] | None"]


class LaunchError(CbvaeError, RuntimeError):
    """The launch failed; the pod (if any) has been terminated."""


class LaunchConfigError(CbvaeError, ValueError):
    """An option of the launch is invalid."""


class PodStartTimeout(LaunchError):
    """The pod did not reach RUNNING with a public SSH port in time."""


class CostCapReached(LaunchError):
    """``max_hours`` or ``max_cost`` was reached."""


class TrainingFailed(LaunchError):
    """The entry script on the pod reported ``failed``."""


class LaunchInterrupted(LaunchError):
    """SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 or SIGUSR2 arrived (Ctrl-C stays a ``KeyboardInterrupt``).

    Args:
        signum: the signal; a CLI exits with ``128 + signum``, the shell's convention.
    """

    def __init__(self, signum: signal.Signals) -> None:
        super().__init__(f"received {signum.name}")
        self.signum = signum


@dataclass
class LaunchConfig:
    """Everything one launch needs except the keys.

    Args:
        image: container image built from the repository's ``Dockerfile`` and pushed to a registry.
        gpu: RunPod GPU type id (``runpod.get_gpus()`` lists them).
        cloud: ``SECURE``, ``COMMUNITY`` or ``ALL``.
        volume_gb: pod volume (mounted at ``volume_mount_path``) holding dataset and outputs.
        container_disk_gb: container disk.
        max_hours: terminate the pod after this many hours (finite); the pod also removes itself then.
        max_cost: terminate the pod once hours x $/h reaches this many dollars (finite).
        epochs: training epochs (``None``: the entry script's GPU default).
        subset: number of studies, or ``None`` for the full database.
        preset: training preset (``gpu``/``cpu``), ``None`` to let the pod choose.
        remote_root: folder on the pod for everything; outputs go to ``<remote_root>/output``.
        local_dir: where the output folder is downloaded.
        download: download outputs over SSH (switch off when a network volume keeps them).
        network_volume_id: RunPod network volume to mount instead of a pod volume.
        volume_mount_path: mount point of the volume.
        name: pod name; default ``cbvae-<time>-<random>`` (unique, used to find a pod whose create reply was lost).
        poll_s: seconds between status polls (at least ``MIN_POLL_S``).
        start_timeout_s: seconds allowed until the pod runs with a public SSH port.
        max_api_failures: consecutive failed API polls tolerated before giving up (lost connection).
        terminate_retries: attempts at ``podTerminate`` when it fails.
        retry_s: first back-off between terminate attempts (doubles).
        lookup_s: how long to look for a pod whose create request was cut off (it may appear later).
        ssh_key: private key for SSH; its ``.pub`` is passed as ``PUBLIC_KEY`` so the pod accepts it.
        ssh_program: ssh executable.
        extra_env: more non-secret pod environment variables (not the launcher's own, not ``RUNPOD_*``).
    """

    image: str
    gpu: str = "NVIDIA GeForce RTX 4090"
    cloud: str = "SECURE"
    volume_gb: int = 60
    container_disk_gb: int = 40
    max_hours: float = 6.0
    max_cost: float = 15.0
    epochs: int | None = None
    subset: int | None = None
    preset: str | None = None
    remote_root: str = "/workspace/cbvae"
    local_dir: Path = Path("runs/runpod")
    download: bool = True
    network_volume_id: str | None = None
    volume_mount_path: str = "/workspace"
    name: str = ""
    poll_s: float = 30.0
    start_timeout_s: float = 1200.0
    max_api_failures: int = 5
    terminate_retries: int = 3
    retry_s: float = 2.0
    lookup_s: float = 60.0
    ssh_key: Path | None = None
    ssh_program: str = "ssh"
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.local_dir = Path(self.local_dir)
        if not self.name:
            self.name = f"cbvae-{datetime.now():%Y%m%d-%H%M%S}-{_random.token_hex(2)}"

    def check_env(self, secrets: Secrets | None = None) -> None:
        """Refuse ``extra_env`` names the launcher or RunPod set, and (given ``secrets``) values holding a key."""
        for name in sorted(self.extra_env):
            if name in (RUNPOD_KEY_VAR, WANDB_KEY_VAR):
                raise LaunchConfigError(f"--env {name}: keys go in .env or the environment, never in arguments")
            if name in _OWN_ENV:
                raise LaunchConfigError(f"--env {name}: the launcher sets it; use {_OWN_ENV[name]} instead")
            if name.startswith("RUNPOD_"):
                raise LaunchConfigError(f"--env {name}: RunPod sets RUNPOD_* in the pod; choose another name")
            if name.startswith(B64_PREFIX):
                raise LaunchConfigError(f"--env {name}: {B64_PREFIX}* is for encoded values; pass NAME=VALUE as it is")
        for name, value in sorted(self.extra_env.items()):
            if secrets is not None and secrets.redact(value) != value:  # never echo the value
                raise LaunchConfigError(
                    f"--env {name}: its value holds an API key; keys go in .env, never in arguments"
                )

    def pipeline_env(self) -> dict[str, Any]:
        """The pod variables set from the pipeline options given (``--epochs``, ``--subset``, ``--preset``)."""
        given = {"CBVAE_EPOCHS": self.epochs, "CBVAE_SUBSET": self.subset, "CBVAE_PRESET": self.preset}
        return {name: value for name, value in given.items() if value is not None}

    def check_pod_values(self) -> None:
        """Refuse a value the entry script would refuse on the pod (``POD_VALUES``), naming the option."""
        for name, value in {**self.pipeline_env(), **self.extra_env}.items():
            if name in POD_VALUES:
                pattern, words, option = POD_VALUES[name]
                if not re.fullmatch(pattern, str(value)):
                    raise LaunchConfigError(f"{option} must be {words}, got {str(value)!r}")

    @property
    def remote_output(self) -> str:
        return self.remote_root.rstrip("/") + "/output"

    def validate(self) -> None:
        """Raise ``LaunchConfigError``/``GraphQLValueError`` naming the bad option."""
        if self.cloud not in CLOUDS:
            raise LaunchConfigError(f"--cloud must be one of {', '.join(CLOUDS)}, got {self.cloud!r}")
        for option, value in (
            ("--max-hours", self.max_hours),
            ("--max-cost", self.max_cost),
            ("--start-timeout", self.start_timeout_s),
        ):
            if not (value > 0 and math.isfinite(value)):  # inf would switch the cap off
                raise LaunchConfigError(f"{option} must be a finite number > 0, got {value}")
        if not self.poll_s >= MIN_POLL_S:
            raise LaunchConfigError(
                f"--poll-s must be >= {MIN_POLL_S:g} s (each poll queries the API), got {self.poll_s}"
            )
        for option, value in (("--volume-gb", self.volume_gb), ("--container-disk-gb", self.container_disk_gb)):
            if not 1 <= int(value) <= MAX_DISK_GB:
                raise LaunchConfigError(f"{option} must be 1 to {MAX_DISK_GB} GB, got {value}")
        self.check_env()
        self.check_pod_values()
        if self.ssh_key is not None and not Path(self.ssh_key).is_file():
            raise LaunchConfigError(f"--ssh-key {self.ssh_key} does not exist; give the private key of a key pair")
        for option, value in (
            ("--image", self.image),
            ("--gpu", self.gpu),
            ("--name", self.name),
            ("--network-volume-id", self.network_volume_id or ""),
            ("--volume-mount-path", self.volume_mount_path),
        ):
            check_value(option, value)
        if not self.image:
            raise LaunchConfigError("--image is required: push the image built from Dockerfile (bundle/docs/cloud.md)")


@dataclass
class LaunchResult:
    """What a launch did."""

    pod_id: str | None = None
    price_per_hour: float | None = None
    hours: float = 0.0
    terminated: bool = False
    status: dict[str, Any] | None = None
    local_dir: Path | None = None
    unknown_pod: bool = False
    deadline: float | None = None

    def leftover(self) -> str:
        """One line on what is left running: said on every exit, true on every path."""
        if self.unknown_pod:
            return "a pod may have been created: check the RunPod console"
        if self.pod_id is None:
            return "no pod was created"
        if self.terminated:
            return f"pod {self.pod_id} terminated"
        return f"pod {self.pod_id} may still be running: python scripts/train_runpod.py --terminate {self.pod_id}" + (
            f" (it removes itself at {datetime.fromtimestamp(self.deadline):%Y-%m-%d %H:%M})" if self.deadline else ""
        )

    @property
    def cost(self) -> float | None:
        return None if self.price_per_hour is None else self.hours * self.price_per_hour


def gpu_price(gpu: Mapping[str, Any], cloud: str) -> float:
    """On-demand $/h of one GPU on ``cloud`` from ``runpod.get_gpu``'s answer.

    Raises:
        LaunchError: the GPU has no price there (not offered on that cloud).
    """
    secure, community = gpu.get("securePrice"), gpu.get("communityPrice")
    lowest = (gpu.get("lowestPrice") or {}).get("uninterruptablePrice")
    if cloud == "SECURE":
        price = secure
    elif cloud == "COMMUNITY":
        price = community
    else:
        price = lowest or min((p for p in (secure, community) if p), default=None)
    if not price or float(price) <= 0:
        raise LaunchError(f"GPU {gpu.get('id')!r} has no {cloud} on-demand price (not offered there); try --cloud ALL")
    return float(price)


def _sdk(api_key: str) -> ModuleType:
    """The RunPod SDK with our key (imported lazily: ``--help`` and ``--dry-run`` never load it)."""
    runpod = require("runpod", needed_by="launching a pod", light=True)

    runpod.api_key = api_key
    return runpod


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PodLauncher:
    """Run one training job on a RunPod pod.

    Args:
        config: the launch options.
        secrets: the keys (RunPod key for the API; W&B key forwarded as pod env ``WANDB_API_KEY``).
        transfer: ``(endpoint, remote_dir, local_dir)`` download step (default: rsync/tar over SSH).
        status_reader: ``(endpoint, remote_dir) -> dict | None`` reading the pod's ``status.json``.
        stream: where progress goes (default stdout); every line is redacted and logged.
        sleep: sleep function between polls.
        clock: monotonic clock in seconds (elapsed time, hence cost).
        wall_clock: Unix time in seconds (the pod's deadline ``CBVAE_DEADLINE``).
    """

    def __init__(
        self,
        config: LaunchConfig,
        secrets: Secrets,
        *,
        transfer: Transfer = download_outputs,
        status_reader: StatusReader = read_status,
        stream: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.transfer = transfer
        self.status_reader = status_reader
        self.stream = stream
        self.sleep = sleep
        self.clock = clock
        self.wall_clock = wall_clock
        self.result = LaunchResult(local_dir=config.local_dir)
        self._started: float | None = None
        self._api_failures = 0
        self._create_cut_off = False
        self._lookup_s = 0.0
        self._signal: signal.Signals | None = None
        self._saying = False
        self._in_api_call = False
        self._held = False  # a signal came during an API call

    # ----- output -------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """Print and log one redacted progress line."""
        message = self.secrets.redact(message)
        self._saying = True  # a signal now is raised at the next check, not inside logging (which would swallow it)
        try:
            print(message, file=self.stream or sys.stdout, flush=True)
            log.info(message)
        finally:
            self._saying = False

    # ----- plan ---------------------------------------------------------------------------
    def pod_env(self, deadline: float | None = None) -> dict[str, str]:
        """The pod's environment, GraphQL-safe (unsafe values base64-encoded as ``CBVAE_B64_<NAME>``).

        Args:
            deadline: Unix time at which the pod removes itself (``CBVAE_DEADLINE``).
        """
        cfg = self.config
        env: dict[str, Any] = {"CBVAE_ROOT": cfg.remote_root, "CBVAE_KEEP_ALIVE": "1"}
        if deadline is not None:
            env[DEADLINE_VAR] = int(deadline)
        env.update(cfg.pipeline_env())
        if cfg.ssh_key is not None:
            env["PUBLIC_KEY"] = Path(f"{cfg.ssh_key}.pub").read_text().strip()
        env.update(cfg.extra_env)
        if self.secrets.wandb_api_key:
            env[WANDB_KEY_VAR] = self.secrets.wandb_api_key
        return encode_env(env)

    def plan(self) -> list[str]:
        """The launch plan as lines, secrets shown only by name; makes no API call."""
        cfg = self.config
        self._validate()
        # decoded, as the pod sees them; values of key-like names hidden, and any known key inside any value
        env = decode_env(self.pod_env())
        shown = {
            k: "<redacted>" if any(w in k.upper() for w in _SECRET_WORDS) else self.secrets.redact(v)
            for k, v in env.items()
        }
        shown[DEADLINE_VAR] = "<launch time + the caps below>"
        return [
            f"pod:        {cfg.name}  image={cfg.image}",
            f"gpu:        1 x {cfg.gpu} on {cfg.cloud} cloud (on-demand $/h queried at launch)",
            f"storage:    volume {cfg.volume_gb} GB at {cfg.volume_mount_path}"
            + (f" (network volume {cfg.network_volume_id})" if cfg.network_volume_id else "")
            + f", container disk {cfg.container_disk_gb} GB; ports 22/tcp",
            "env:        " + ", ".join(f"{k}={v}" for k, v in shown.items()),
            "wandb:      "
            + (
                "online, project cbvae (WANDB_API_KEY set)"
                if self.secrets.wandb_api_key
                else "offline on the pod (no WANDB_API_KEY): wandb sync the downloaded runs/*/wandb later"
            ),
            f"job:        scripts/runpod_train.sh -> {cfg.remote_output} (status.json polled every {cfg.poll_s:g} s)",
            f"download:   {'rsync/tar over SSH to ' + str(cfg.local_dir) if cfg.download else 'off (outputs stay on the volume)'}",
            f"caps:       terminate after {cfg.max_hours:g} h or ${cfg.max_cost:.2f}; pod start timeout {cfg.start_timeout_s:g} s",
            "self-limit: the pod removes itself at the same cap (CBVAE_DEADLINE), even if this launcher dies",
            f"estimate:   at most ${cfg.max_cost:.2f} (min of --max-cost and --max-hours x $/h)",
        ]

    # ----- lifecycle ----------------------------------------------------------------------
    def _validate(self) -> None:
        self.config.validate()
        self.config.check_env(self.secrets)

    def run(self) -> LaunchResult:
        """Launch, follow, download, terminate. Raises ``LaunchError`` (pod terminated) or ``KeyboardInterrupt``."""
        cfg = self.config
        self._validate()
        self.pod_env()  # fails on a bad variable before any API call
        rp = _sdk(self.secrets.require_runpod())
        gpu = rp.get_gpu(cfg.gpu)
        price = self.result.price_per_hour = gpu_price(gpu, cfg.cloud)
        hours = min(cfg.max_hours, cfg.max_cost / price)
        self.say(
            f"GPU {gpu.get('displayName', cfg.gpu)} on {cfg.cloud}: ${price:.3f}/h; "
            f"estimated cost at most ${price * hours:.2f} (caps {cfg.max_hours:g} h, ${cfg.max_cost:.2f})"
        )
        failed = True
        try:
            with self._signals_raise():
                self._create(rp, hours)
                endpoint = self._wait_running(rp)
                self.result.status = self._follow(rp, endpoint)
                if cfg.download:
                    self._check_signal()
                    self._download(endpoint, partial=False)
            failed = False
        finally:
            # a second Ctrl-C (or any signal) must not cut the lookup of a half-created pod or its termination
            with self._signals_deferred():
                if self._create_cut_off:
                    self._find_pod_by_name(rp)
                self.result.terminated = self._terminate(rp)
                self._report_cost()
        if not self.result.terminated and not failed:
            raise LaunchError(f"pod {self.result.pod_id} could not be terminated; terminate it in the RunPod console")
        return self.result

    def _create(self, rp: ModuleType, hours: float) -> None:
        cfg = self.config
        self._started = self.clock()  # billing starts with the request
        # the pod's own limit: the same cap as ours, counted from the same moment
        deadline = self.result.deadline = self.wall_clock() + hours * 3600
        env = self.pod_env(deadline)
        self.say(
            f"creating pod {cfg.name} ({cfg.gpu}, {cfg.cloud}, image {cfg.image}); "
            f"it removes itself at {datetime.fromtimestamp(deadline):%Y-%m-%d %H:%M} whatever happens here"
        )
        try:
            with self._api_call():
                pod = rp.create_pod(
                    name=cfg.name,
                    image_name=cfg.image,
                    gpu_type_id=cfg.gpu,
                    cloud_type=cfg.cloud,
                    support_public_ip=True,
                    start_ssh=True,
                    volume_in_gb=int(cfg.volume_gb),
                    container_disk_in_gb=int(cfg.container_disk_gb),
                    ports="22/tcp",
                    volume_mount_path=cfg.volume_mount_path,
                    env=env,
                    network_volume_id=cfg.network_volume_id,
                )
        except rp.error.QueryError:
            # the API answered with an error: nothing was created, but check once by the unique name
            self._create_cut_off, self._lookup_s = True, 0.0
            raise
        except BaseException:
            # cut off (a lost connection, a timeout): the pod may exist, or appear a little later
            self._create_cut_off, self._lookup_s = True, cfg.lookup_s
            raise
        self.result.pod_id = pod["id"]
        self.say(f"pod {pod['id']} created")
        self._check_signal()

    def _find_pod_by_name(self, rp: ModuleType) -> None:
        """Set ``result.pod_id`` to the pod named like ours; keep looking for ``lookup_s`` (it may still be in
        creation) and retry an unreachable API ``terminate_retries`` times; unsure -> ``result.unknown_pod``."""
        cfg, delay, start = self.config, self.config.retry_s, self.clock()
        self.say(f"looking for pod {cfg.name} (its create request did not complete)")
        answered, attempts = False, 0
        while True:
            attempts += 1
            try:
                pods = rp.get_pods() or []
            except Exception as err:
                self.say(f"warning: listing pods failed: {err}")
            else:
                answered = True
                pod_id = next((str(p["id"]) for p in pods if p.get("name") == cfg.name), None)
                if pod_id is not None:
                    self.result.pod_id = pod_id
                    self.say(f"pod {pod_id} was created")
                    return
            if self.clock() - start + delay > self._lookup_s and (answered or attempts >= cfg.terminate_retries):
                break
            self.sleep(delay)
            delay = min(delay * 2, 10.0)
        if not answered:
            self.result.unknown_pod = True
            self.say(f"warning: could not check whether pod {cfg.name} was created; look for it in the RunPod console")

    def _elapsed(self) -> float:
        return 0.0 if self._started is None else self.clock() - self._started

    def _cost(self) -> float:
        return self._elapsed() / 3600 * (self.result.price_per_hour or 0.0)

    def _check_signal(self) -> None:
        if self._signal is not None:
            if self._held:
                self._held = False
                self.say(f"{self._signal.name} arrived during a RunPod API call: stopping now that it has answered")
            raise self._interruption()

    def _interruption(self) -> BaseException:
        """What the remembered signal raises: ``KeyboardInterrupt`` for Ctrl-C, else ``LaunchInterrupted``."""
        assert self._signal is not None
        return KeyboardInterrupt() if self._signal == signal.SIGINT else LaunchInterrupted(self._signal)

    @contextlib.contextmanager
    def _api_call(self) -> Iterator[None]:
        """Around one SDK request: a signal waits until it answers (at most the SDK's 30 s timeout).

        An exception raised by a signal handler inside requests/urllib3 can leave one of their locks held, and
        the launcher then hangs when the request's remains are freed (seen once on a loaded machine: SIGUSR1
        during a ``pod`` query, then nothing for 60 s). Held back, it is raised by the caller's next
        ``_check_signal``, once what the call returned is recorded (a created pod's id).
        """
        self._in_api_call = True
        try:
            yield
        finally:
            self._in_api_call = False

    def _check_caps(self) -> None:
        self._check_signal()
        cfg, hours, cost = self.config, self._elapsed() / 3600, self._cost()
        self.result.hours = hours
        # tolerance: the last pause ends exactly at a cap, where float rounding could leave it a hair short
        if hours >= cfg.max_hours * (1 - 1e-9):
            raise CostCapReached(f"--max-hours {cfg.max_hours:g} reached ({_hms(self._elapsed())}, ${cost:.2f})")
        if cost >= cfg.max_cost * (1 - 1e-9):
            raise CostCapReached(f"--max-cost ${cfg.max_cost:.2f} reached after {_hms(self._elapsed())} (${cost:.2f})")

    def _pause(self) -> None:
        """Sleep one poll interval, but never past a cap."""
        cfg, price = self.config, self.result.price_per_hour or 0.0
        left = cfg.max_hours * 3600 - self._elapsed()
        if price > 0:
            left = min(left, (cfg.max_cost - self._cost()) / price * 3600)
        self.sleep(max(min(cfg.poll_s, left), 0.0))

    def _poll_pod(self, rp: ModuleType) -> dict[str, Any] | None:
        """The pod, or ``None`` after a transient API failure (too many in a row raise)."""
        try:
            with self._api_call():
                pod = rp.get_pod(self.result.pod_id)
        except Exception as err:  # requests errors and runpod.error.* alike: the API is unreachable or failing
            self._check_signal()  # a signal held during the failed call ends the launch, not a retry
            self._api_failures += 1
            if self._api_failures >= self.config.max_api_failures:
                raise LaunchError(f"RunPod API failed {self._api_failures} times in a row: {err}") from err
            self.say(f"warning: RunPod API call failed ({err}); retrying")
            return None
        self._api_failures = 0
        self._check_signal()
        if pod is None:
            raise LaunchError(f"pod {self.result.pod_id} no longer exists")
        rate = float(pod.get("costPerHr") or 0.0)
        if rate > (self.result.price_per_hour or 0.0):
            self.result.price_per_hour = rate  # the pod's billed rate, if higher, drives the cost cap
        if pod.get("desiredStatus") in _STOPPED:
            raise LaunchError(f"pod {self.result.pod_id} stopped ({pod['desiredStatus']}) before the job finished")
        return pod

    def _endpoint(self, pod: Mapping[str, Any] | None) -> SSHEndpoint | None:
        cfg = self.config
        known_hosts = cfg.local_dir / ".ssh_known_hosts"
        return endpoint_from_pod(pod, key_path=cfg.ssh_key, program=cfg.ssh_program, known_hosts=known_hosts)

    def _wait_running(self, rp: ModuleType) -> SSHEndpoint:
        cfg, last = self.config, None
        while True:
            self._check_caps()
            if self._elapsed() > cfg.start_timeout_s:
                raise PodStartTimeout(
                    f"pod {self.result.pod_id} did not start with a public SSH port within {cfg.start_timeout_s:g} s; "
                    "try another --gpu/--cloud or a larger --start-timeout"
                )
            pod = self._poll_pod(rp)
            endpoint = self._endpoint(pod)
            if endpoint is not None:
                self.say(f"[{_hms(self._elapsed())}] pod {self.result.pod_id} running; {endpoint}")
                return endpoint
            state = (pod or {}).get("desiredStatus", "unknown")
            if state != last:
                self.say(f"[{_hms(self._elapsed())}] pod {self.result.pod_id}: {state}, waiting for its SSH port")
                last = state
            self._pause()

    def _follow(self, rp: ModuleType, endpoint: SSHEndpoint) -> dict[str, Any]:
        last: tuple | None = None
        while True:
            self._check_caps()
            endpoint = self._endpoint(self._poll_pod(rp)) or endpoint  # the public port may change on restart
            status = self.status_reader(endpoint, self.config.remote_output)
            if status:
                state, step = status.get("state"), status.get("step")
                if (state, step) != last:
                    message = status.get("message") or ""
                    self.say(
                        f"[{_hms(self._elapsed())}] ${self._cost():.2f} job: {state} {step or ''} {message}".rstrip()
                    )
                    last = (state, step)
                if state == "done":
                    return status
                if state == "failed":
                    if self.config.download:
                        self._download(endpoint, partial=True)
                    raise TrainingFailed(
                        f"the job on the pod failed at step {step!r}: {status.get('message', '')}; "
                        f"its logs are in {self.config.local_dir / 'logs'}"
                    )
            self._pause()

    def _download(self, endpoint: SSHEndpoint, partial: bool) -> None:
        cfg = self.config
        self.say(f"downloading {cfg.remote_output} -> {cfg.local_dir}")
        try:
            self.transfer(endpoint, cfg.remote_output, cfg.local_dir)
        except Exception as err:
            if not partial:
                raise
            self.say(f"warning: could not download the logs ({err})")
            return
        self.say(f"downloaded to {cfg.local_dir}")

    def _terminate(self, rp: ModuleType) -> bool:
        """Send ``podTerminate`` once (retrying only on failure); True when no pod is left running."""
        pod_id, cfg = self.result.pod_id, self.config
        self.result.hours = self._elapsed() / 3600
        if pod_id is None or self.result.terminated:
            return True
        delay = cfg.retry_s
        for attempt in range(1, cfg.terminate_retries + 1):
            try:
                rp.terminate_pod(pod_id)
            except Exception as err:
                self.say(f"warning: terminating pod {pod_id} failed (attempt {attempt}/{cfg.terminate_retries}): {err}")
                if attempt < cfg.terminate_retries:
                    self.sleep(delay)
                    delay *= 2
                continue
            self.say(f"pod {pod_id} terminated")
            return True
        if self._pod_gone(rp, pod_id):
            self.say(f"pod {pod_id} is gone (it removed itself at its deadline)")
            return True
        self.say(
            f"error: pod {pod_id} may still be running and billing; terminate it in the RunPod console "
            f"or with: python scripts/train_runpod.py --terminate {pod_id}"
        )
        return False

    @staticmethod
    def _pod_gone(rp: ModuleType, pod_id: str) -> bool:
        try:
            pod = rp.get_pod(pod_id)
        except Exception:
            return False
        return pod is None or pod.get("desiredStatus") == "TERMINATED"

    def _report_cost(self) -> None:
        result = self.result
        if result.pod_id is not None and result.cost is not None:
            self.say(
                f"pod time {_hms(result.hours * 3600)} at ${result.price_per_hour:.3f}/h: final cost about ${result.cost:.2f}"
            )

    # ----- signals ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals_raise(self) -> Iterator[None]:
        """SIGTERM/SIGHUP/SIGQUIT/SIGUSR1 (killed job, closed terminal, Ctrl-\\) raise ``LaunchInterrupted`` so
        ``finally`` terminates the pod (their default action would end the launcher with the pod running); Ctrl-C
        raises ``KeyboardInterrupt`` as usual. Neither is raised inside logging or an API call (held until it ends)."""

        def handler(signum: int, frame: Any) -> None:
            # remembered too: a raise that lands inside an ``except Exception`` (a status read) is swallowed,
            # so every poll checks it again
            self._signal = signal.Signals(signum)
            self._held = self._held or self._in_api_call
            if not (self._saying or self._in_api_call):
                raise self._interruption()

        with _handlers({s: handler for s in _catchable(signal.SIGINT, *_ENDING_SIGNALS)}):
            yield

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """While finding and terminating the pod, a second Ctrl-C or any ending signal must not abort it."""

        def handler(signum: int, frame: Any) -> None:
            self.say(f"{signal.Signals(signum).name} ignored: terminating the pod first")

        with _handlers({s: handler for s in _catchable(signal.SIGINT, *_ENDING_SIGNALS)}):
            yield


#: signals whose default action ends the launcher (SIGINT stays a KeyboardInterrupt)
_ENDING_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def _catchable(*signals: signal.Signals | str) -> list[signal.Signals]:
    return [
        getattr(signal, s) if isinstance(s, str) else s for s in signals if not isinstance(s, str) or hasattr(signal, s)
    ]


@contextlib.contextmanager
def _handlers(handlers: Mapping[signal.Signals, Callable[[int, Any], None]]) -> Iterator[None]:
    """Install signal handlers for the block (only possible in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, fn) for sig, fn in handlers.items()}
    try:
        yield
    finally:
        for sig, fn in previous.items():
            signal.signal(sig, fn)


def describe_pod(pod_id: str, secrets: Secrets) -> dict[str, Any]:
    """Status summary of a pod, without its environment (which holds the W&B key).

    Raises:
        LaunchError: the pod does not exist.
    """
    pod = _sdk(secrets.require_runpod()).get_pod(check_value("pod id", pod_id))
    if pod is None:
        raise LaunchError(f"pod {pod_id} not found (already terminated?)")
    endpoint = endpoint_from_pod(pod)
    return {
        "id": pod.get("id"),
        "name": pod.get("name"),
        "status": pod.get("desiredStatus"),
        "gpu": (pod.get("machine") or {}).get("gpuDisplayName"),
        "cost_per_hour": pod.get("costPerHr"),
        "uptime_s": pod.get("uptimeSeconds"),
        "ssh_host": endpoint.host if endpoint else None,
        "ssh_port": endpoint.port if endpoint else None,
    }


def terminate_pod_by_id(pod_id: str, secrets: Secrets) -> None:
    """Terminate a pod by id (manual cleanup)."""
    _sdk(secrets.require_runpod()).terminate_pod(check_value("pod id", pod_id))
