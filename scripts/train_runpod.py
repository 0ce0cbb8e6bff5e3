#!/usr/bin/env python
"""Train cbvae on a RunPod GPU pod: create it, follow training, download the outputs, always terminate it.

Keys come from the environment or an ignored ``.env`` (see ``.env.example``): ``RUNPOD_API_KEY`` (required)
and ``WANDB_API_KEY`` (optional; without it the pod logs W&B offline). They are never printed, logged,
written to disk or accepted as arguments. The pod also removes itself at the cap (``--max-hours`` /
``--max-cost``), so even ``kill -9`` of this launcher cannot leave it running past the cap.

Examples::

    python scripts/train_runpod.py --image ghcr.io/you/cbvae:latest --dry-run
    python scripts/train_runpod.py --image ghcr.io/you/cbvae:latest --gpu "NVIDIA GeForce RTX 4090" \\
        --max-hours 4 --max-cost 5 --out runs/runpod
    python scripts/train_runpod.py --status POD_ID     # or: scripts/monitor_runpod.sh POD_ID
    python scripts/train_runpod.py --terminate POD_ID  # manual cleanup

Exit status: 0 done, 1 launch/training failure (pod terminated), 2 bad input (one line, no API call),
128 + N ended by signal N (130 Ctrl-C, 129 SIGHUP, 131 SIGQUIT, 138 SIGUSR1, 140 SIGUSR2, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from dotenv import dotenv_values

from cbvae_ext.cloud.graphql_safety import GraphQLValueError
from cbvae_ext.cloud.launcher import (
    CLOUDS,
    MIN_POLL_S,
    LaunchConfig,
    LaunchConfigError,
    LaunchInterrupted,
    PodLauncher,
    describe_pod,
    terminate_pod_by_id,
)
from cbvae_ext.cloud.secrets import RedactingFilter, Secrets, SecretsError, env_file_warning, load_secrets

__all__ = ["main", "parse_args"]


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--env expects NAME=VALUE, got {text!r}")
    return name, value


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments end in one ``error:`` line (exit 2), like every other bad input, not usage plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="train_runpod.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the whole plan; no API call")
    action.add_argument("--status", metavar="POD_ID", help="print a pod's status as JSON and exit")
    action.add_argument("--terminate", metavar="POD_ID", help="terminate a pod and exit")
    parser.add_argument("--image", default=None, help="image built from Dockerfile (default: $CBVAE_IMAGE)")
    parser.add_argument("--gpu", default="NVIDIA GeForce RTX 4090", help="RunPod GPU type id (default: %(default)s)")
    parser.add_argument("--cloud", default="SECURE", choices=CLOUDS, help="RunPod cloud (default: %(default)s)")
    parser.add_argument("--volume-gb", type=int, default=60, help="pod volume at /workspace (default: %(default)s)")
    parser.add_argument("--container-disk-gb", type=int, default=40, help="container disk (default: %(default)s)")
    parser.add_argument("--network-volume-id", default=None, help="mount this network volume (outputs outlive the pod)")
    parser.add_argument(
        "--max-hours", type=float, default=6.0, help="terminate after this long; the pod too (default: %(default)s)"
    )
    parser.add_argument("--max-cost", type=float, default=15.0, help="terminate at this many $ (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the pod's GPU default)")
    parser.add_argument("--subset", type=int, default=None, help="number of studies (default: all)")
    parser.add_argument("--preset", choices=("gpu", "cpu"), default=None, help="training preset (default: auto)")
    parser.add_argument("--out", type=Path, default=Path("runs/runpod"), help="download folder (default: %(default)s)")
    parser.add_argument("--no-download", action="store_true", help="leave outputs on the (network) volume")
    parser.add_argument("--remote-root", default="/workspace/cbvae", help="folder on the pod (default: %(default)s)")
    parser.add_argument("--ssh-key", type=Path, default=None, help="private key; KEY.pub is installed on the pod")
    parser.add_argument("--ssh-program", default="ssh", help="ssh executable (default: %(default)s)")
    parser.add_argument(
        "--env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE", help="extra pod env"
    )
    parser.add_argument("--name", default="", help="pod name (default: cbvae-<time>-<random>)")
    parser.add_argument(
        "--poll-s", type=float, default=30.0, help=f"seconds between polls, >= {MIN_POLL_S:g} (default: %(default)s)"
    )
    parser.add_argument("--start-timeout", type=float, default=1200.0, help="seconds for the pod to start")
    parser.add_argument("--env-file", type=Path, default=Path(".env"), help="dotenv file with keys (default: .env)")
    return parser.parse_args(argv)


def _setup_log(path: Path, secrets: Secrets) -> None:
    """Launcher log next to the downloads; the redacting filter sits on the handler so nothing bypasses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(secrets.values()))
    logger = logging.getLogger("cbvae_ext.cloud")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secrets = Secrets()
    launcher: PodLauncher | None = None
    try:
        warning = env_file_warning(args.env_file)
        if warning:
            print(warning, file=sys.stderr)
        secrets = load_secrets(args.env_file)
        if args.status:
            print(json.dumps(describe_pod(args.status, secrets), indent=2))
            return 0
        if args.terminate:
            terminate_pod_by_id(args.terminate, secrets)
            print(f"pod {args.terminate} terminated")
            return 0
        file_env = dotenv_values(args.env_file) if args.env_file.is_file() else {}
        config = LaunchConfig(
            image=args.image or os.environ.get("CBVAE_IMAGE") or file_env.get("CBVAE_IMAGE") or "",
            gpu=args.gpu,
            cloud=args.cloud,
            volume_gb=args.volume_gb,
            container_disk_gb=args.container_disk_gb,
            max_hours=args.max_hours,
            max_cost=args.max_cost,
            epochs=args.epochs,
            subset=args.subset,
            preset=args.preset,
            remote_root=args.remote_root,
            local_dir=args.out,
            download=not args.no_download,
            network_volume_id=args.network_volume_id,
            name=args.name,
            poll_s=args.poll_s,
            start_timeout_s=args.start_timeout,
            ssh_key=args.ssh_key,
            ssh_program=args.ssh_program,
            extra_env=dict(args.env),
        )
        launcher = PodLauncher(config, secrets)
        if args.dry_run:
            print("\n".join(launcher.plan()))
            return 0
        config.validate()
        _setup_log(args.out / "launcher.log", secrets)
        result = launcher.run()
        print(f"done: outputs in {result.local_dir}" if config.download else "done: outputs on the volume")
        return 0
    except (SecretsError, GraphQLValueError, LaunchConfigError) as err:
        print(f"error: {secrets.redact(str(err))}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, LaunchInterrupted) as err:
        signum = err.signum if isinstance(err, LaunchInterrupted) else signal.SIGINT
        left = launcher.result.leftover() if launcher else "no pod was created"
        print(f"error: interrupted by {signum.name}; {left}", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # one line, never a traceback (it could hold the SDK's query text)
        print(f"error: {type(err).__name__}: {secrets.redact(str(err))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
