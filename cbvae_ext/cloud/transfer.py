"""SSH access to a pod's public port 22: read its training status and download its output folder.

A RunPod pod exposes ``22/tcp`` on a public IP and port listed in ``pod.runtime.ports``. Downloads use
``rsync`` when it is installed (resumable), else a ``tar`` stream over ``ssh`` that needs nothing but
``ssh`` locally and ``tar`` on the pod.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbvae_ext.errors import CbvaeError

__all__ = ["SSHEndpoint", "TransferError", "download_outputs", "endpoint_from_pod", "read_status", "run_remote"]


class TransferError(CbvaeError, RuntimeError):
    """Downloading or reading files from the pod failed."""


@dataclass(frozen=True)
class SSHEndpoint:
    """Where and how to reach a pod over SSH.

    Args:
        host: public IP of the pod.
        port: public port mapped to the pod's port 22.
        user: login user (RunPod images log in as root).
        key_path: private key; ``None`` uses the ssh agent / default keys.
        program: ssh executable (``ssh`` or a wrapper with the same command line).
        known_hosts: known-hosts file; pods reuse IPs, so a per-launch file avoids stale host keys.
    """

    host: str
    port: int
    user: str = "root"
    key_path: Path | None = None
    program: str = "ssh"
    known_hosts: Path | None = None

    def options(self) -> list[str]:
        """ssh options (no program, no destination)."""
        opts = ["-p", str(self.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"]
        opts += ["-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=30"]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.key_path is not None:
            opts += ["-i", str(self.key_path)]
        return opts

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def command(self, remote_command: str) -> list[str]:
        """Argument list that runs ``remote_command`` on the pod."""
        return [self.program, *self.options(), self.destination, remote_command]

    def __str__(self) -> str:
        return f"ssh {shlex.join([*self.options(), self.destination])}"


def endpoint_from_pod(pod: Mapping[str, Any] | None, **kwargs: Any) -> SSHEndpoint | None:
    """The public SSH endpoint of a pod returned by ``runpod.get_pod``, or ``None`` while it has none.

    Args:
        pod: the pod dict (``runtime.ports`` entries with ``ip``, ``isIpPublic``, ``privatePort``, ``publicPort``).
        kwargs: other :class:`SSHEndpoint` fields (``key_path``, ``program``, ``known_hosts``).
    """
    runtime = (pod or {}).get("runtime") or {}
    for port in runtime.get("ports") or []:
        if port.get("privatePort") == 22 and port.get("isIpPublic") and port.get("type", "tcp") == "tcp":
            return SSHEndpoint(host=str(port["ip"]), port=int(port["publicPort"]), **kwargs)
    return None


def run_remote(endpoint: SSHEndpoint, remote_command: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a command on the pod and capture its output (never raises on a non-zero exit)."""
    return subprocess.run(endpoint.command(remote_command), capture_output=True, text=True, timeout=timeout)


def read_status(endpoint: SSHEndpoint, remote_dir: str) -> dict[str, Any] | None:
    """The pod's ``status.json`` (written by ``scripts/runpod_train.sh``), or ``None`` if not readable yet."""
    try:
        proc = run_remote(endpoint, f"cat {shlex.quote(remote_dir.rstrip('/') + '/status.json')}")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        status = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None  # caught mid-write: read it again at the next poll
    return status if isinstance(status, dict) else None


def download_outputs(
    endpoint: SSHEndpoint,
    remote_dir: str,
    local_dir: str | Path,
    exclude: Sequence[str] = (),
    timeout: float = 6 * 3600,
) -> Path:
    """Copy the pod's ``remote_dir`` into ``local_dir`` (created), keeping the tree.

    Args:
        endpoint: the pod's SSH endpoint.
        remote_dir: folder on the pod.
        local_dir: destination folder.
        exclude: glob patterns (relative to ``remote_dir``) to skip, e.g. large intermediates.
        timeout: seconds before the copy is abandoned.

    Raises:
        TransferError: the copy failed; the message holds the tool's last error line.
    """
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    remote = remote_dir.rstrip("/")
    try:
        if shutil.which("rsync") and endpoint.program == "ssh":
            cmd = ["rsync", "-az", "--partial", "-e", shlex.join(["ssh", *endpoint.options()])]
            cmd += [f"--exclude={pattern}" for pattern in exclude]
            cmd += [f"{endpoint.destination}:{remote}/", f"{local}/"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise TransferError(f"rsync from {endpoint.destination}:{remote} failed: {_last_line(proc.stderr)}")
            return local
        tar_cmd = shlex.join(["tar", "-C", remote, *[f"--exclude=./{p}" for p in exclude], "-cf", "-", "."])
        with subprocess.Popen(endpoint.command(tar_cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                    # "data" filter: no absolute paths, links or devices from the remote side
                    archive.extractall(local, filter="data")
            except tarfile.TarError as err:
                proc.kill()
                raise TransferError(f"download from {endpoint.destination}:{remote} failed: {err}") from err
            finally:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                proc.wait(timeout=timeout)
        if proc.returncode != 0:
            raise TransferError(f"download from {endpoint.destination}:{remote} failed: {_last_line(stderr)}")
    except (OSError, subprocess.TimeoutExpired) as err:
        raise TransferError(f"download from {endpoint.destination}:{remote} failed: {err}") from err
    return local


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"
