"""SSH endpoint discovery, status reading and the tar-over-ssh download, with an ``ssh`` stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbvae_ext.cloud import SSHEndpoint, TransferError, download_outputs, endpoint_from_pod, read_status

FAKE_SSH = """#!/bin/sh
while [ $# -gt 1 ]; do case "$1" in -p|-o|-i) shift 2 ;; *) shift ;; esac; done
exec sh -c "$1"
"""


@pytest.fixture
def endpoint(tmp_path: Path) -> SSHEndpoint:
    ssh = tmp_path / "fake_ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    return SSHEndpoint("127.0.0.1", 2222, program=str(ssh))


def test_endpoint_comes_from_the_public_tcp_port_22():
    ports = [
        {"ip": "10.0.0.2", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"},
        {"ip": "100.1.2.3", "isIpPublic": True, "privatePort": 8888, "publicPort": 40001, "type": "http"},
        {"ip": "100.1.2.3", "isIpPublic": True, "privatePort": 22, "publicPort": 40022, "type": "tcp"},
    ]
    ep = endpoint_from_pod({"runtime": {"ports": ports}}, key_path=Path("/k/id"))
    assert (ep.host, ep.port, ep.user) == ("100.1.2.3", 40022, "root")
    assert ep.command("ls")[-2:] == ["root@100.1.2.3", "ls"] and ["-p", "40022"] == ep.options()[:2]
    assert ep.options()[-2:] == ["-i", "/k/id"]
    assert endpoint_from_pod({"runtime": None}) is None and endpoint_from_pod(None) is None
    assert endpoint_from_pod({"runtime": {"ports": ports[:2]}}) is None


def test_read_status(endpoint: SSHEndpoint, tmp_path: Path):
    remote = tmp_path / "remote out"  # a space: the remote command must quote paths
    remote.mkdir()
    assert read_status(endpoint, str(remote)) is None
    (remote / "status.json").write_text('{"state": "runn')  # caught mid-write
    assert read_status(endpoint, str(remote)) is None
    (remote / "status.json").write_text(json.dumps({"state": "running", "step": "evaluate"}))
    assert read_status(endpoint, str(remote)) == {"state": "running", "step": "evaluate"}


def test_tar_download_copies_the_tree_and_honours_excludes(endpoint: SSHEndpoint, tmp_path: Path):
    remote = tmp_path / "remote"
    (remote / "runs" / "cbvae").mkdir(parents=True)
    (remote / "runs" / "cbvae" / "model.pt").write_bytes(b"\x00\x01weights")
    (remote / "eval").mkdir()
    (remote / "eval" / "test_results.json").write_text("{}")
    (remote / "scratch.npy").write_bytes(b"big")
    local = download_outputs(endpoint, str(remote) + "/", tmp_path / "local" / "run", exclude=["*.npy"])
    assert (local / "runs" / "cbvae" / "model.pt").read_bytes() == b"\x00\x01weights"
    assert (local / "eval" / "test_results.json").read_text() == "{}"
    assert not (local / "scratch.npy").exists()


def test_download_failure_is_a_transfer_error(endpoint: SSHEndpoint, tmp_path: Path):
    with pytest.raises(TransferError, match="download from root@127.0.0.1:.*missing failed"):
        download_outputs(endpoint, str(tmp_path / "missing"), tmp_path / "local")
    broken = SSHEndpoint("127.0.0.1", 22, program=str(tmp_path / "no_such_ssh"))
    with pytest.raises(TransferError, match="failed"):
        download_outputs(broken, str(tmp_path), tmp_path / "local")
