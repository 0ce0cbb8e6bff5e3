"""Cloud training on RunPod: secrets, GraphQL-safe pod parameters, pod lifecycle and result transfer.

The launcher (``scripts/train_runpod.py``) is a thin CLI over :class:`~cbvae_ext.cloud.launcher.PodLauncher`;
the pod runs ``scripts/runpod_train.sh`` (the pipeline ``scripts/run_main.sh`` plus the pod's own deadline,
:mod:`~cbvae_ext.cloud.pod_deadline`), which also runs on any bare Linux GPU machine. ``pod_deadline`` and
``job_status`` are run as ``python -m`` by the scripts, so this package does not import them.
"""

from __future__ import annotations

from cbvae_ext.cloud.graphql_safety import GraphQLValueError, check_value, encode_env
from cbvae_ext.cloud.launcher import (
    CostCapReached,
    LaunchConfig,
    LaunchConfigError,
    LaunchError,
    LaunchInterrupted,
    LaunchResult,
    PodLauncher,
    PodStartTimeout,
    TrainingFailed,
)
from cbvae_ext.cloud.secrets import RedactingFilter, Secrets, SecretsError, load_secrets
from cbvae_ext.cloud.transfer import SSHEndpoint, TransferError, download_outputs, endpoint_from_pod, read_status

__all__ = [
    "CostCapReached",
    "GraphQLValueError",
    "LaunchConfig",
    "LaunchConfigError",
    "LaunchError",
    "LaunchInterrupted",
    "LaunchResult",
    "PodLauncher",
    "PodStartTimeout",
    "RedactingFilter",
    "SSHEndpoint",
    "Secrets",
    "SecretsError",
    "TrainingFailed",
    "TransferError",
    "check_value",
    "download_outputs",
    "encode_env",
    "endpoint_from_pod",
    "load_secrets",
    "read_status",
]
