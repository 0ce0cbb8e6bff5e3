"""The pod's own time limit: remove this RunPod pod at a deadline, whatever happens to the launcher.

The launcher's caps stop a pod only while the launcher lives (SIGKILL, a crashed laptop or a lost
network would leave a paid pod running), so the pod bounds itself too. RunPod sets ``RUNPOD_POD_ID``
and a pod-scoped ``RUNPOD_API_KEY`` in every pod (docs.runpod.io, "Pod environment variables"); with
them the pod sends the same GraphQL ``podTerminate`` mutation as the launcher (``runpod.terminate_pod``,
which honours ``RUNPOD_API_BASE_URL``), and falls back on ``runpodctl remove pod $RUNPOD_POD_ID`` (RunPod's
documented CLI way) where that tool exists. The launcher passes the deadline as ``CBVAE_DEADLINE``
(Unix time: pod creation + ``min(--max-hours, --max-cost / $/h)``); ``scripts/runpod_train.sh`` runs
``watch`` in the background from container start, and after the job lingers for the download, then removes the pod;
on any other exit of the script (PID 1 of the container, whose exit kills the watchdog) it runs ``remove`` at once.

    python -m cbvae_ext.cloud.pod_deadline watch --until UNIX_TIME [--reason TEXT]
    python -m cbvae_ext.cloud.pod_deadline remove [--reason TEXT]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from cbvae_ext.cloud.graphql_safety import check_value
from cbvae_ext.cloud.secrets import redact
from cbvae_ext.errors import CbvaeError
from cbvae_ext.extras import require

__all__ = ["POD_ID_VAR", "POD_KEY_VAR", "SelfRemovalError", "main", "remove_this_pod", "wait_until"]

POD_ID_VAR = "RUNPOD_POD_ID"
POD_KEY_VAR = "RUNPOD_API_KEY"


class SelfRemovalError(CbvaeError, RuntimeError):
    """This machine cannot remove itself (not a RunPod pod, or no pod-scoped key)."""


def wait_until(
    deadline: float, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Sleep until the wall clock reaches ``deadline`` (in steps of at most a minute: robust to clock jumps)."""
    while (left := deadline - clock()) > 0:
        sleep(min(left, 60.0))


def remove_this_pod(
    environ: Mapping[str, str] | None = None,
    attempts: int = 5,
    retry_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
) -> bool:
    """Terminate the pod this runs on; True when the API accepted it.

    Args:
        environ: the pod's environment (default ``os.environ``): ``RUNPOD_POD_ID`` and ``RUNPOD_API_KEY``.
        attempts: ``podTerminate`` attempts (back-off doubling from ``retry_s``) before ``runpodctl``.
        retry_s: first pause between attempts.
        sleep: sleep function.
        say: where progress lines go (the key is never in them).

    Raises:
        SelfRemovalError: ``RUNPOD_POD_ID`` or ``RUNPOD_API_KEY`` is not set.
    """
    environ = os.environ if environ is None else environ
    pod_id, key = environ.get(POD_ID_VAR, ""), environ.get(POD_KEY_VAR, "")
    if not pod_id or not key:
        raise SelfRemovalError(f"{POD_ID_VAR} and {POD_KEY_VAR} must be set (RunPod sets both in a pod) to remove it")
    check_value(POD_ID_VAR, pod_id)
    runpod = require("runpod", needed_by="removing the pod", light=True)

    runpod.api_key = key
    delay = retry_s
    for attempt in range(1, attempts + 1):
        try:
            runpod.terminate_pod(pod_id)
        except Exception as err:  # requests and runpod.error alike: retry, then fall back on runpodctl
            say(f"[cbvae] warning: removing pod {pod_id} failed ({attempt}/{attempts}): {redact(str(err), [key])}")
            if attempt < attempts:
                sleep(delay)
                delay *= 2
            continue
        say(f"[cbvae] pod {pod_id} removed")
        return True
    ctl = shutil.which("runpodctl")
    if ctl and subprocess.run([ctl, "remove", "pod", pod_id], capture_output=True, timeout=120).returncode == 0:
        say(f"[cbvae] pod {pod_id} removed with runpodctl")
        return True
    say(f"[cbvae] error: pod {pod_id} could not remove itself; terminate it in the RunPod console")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbvae_ext.cloud.pod_deadline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch", help="wait until a Unix time, then remove this pod")
    watch.add_argument("--until", type=float, required=True, help="Unix time (seconds) of the deadline")
    remove = sub.add_parser("remove", help="remove this pod now")
    for p in (watch, remove):
        p.add_argument("--reason", default="", help="said in the log line")
    args = parser.parse_args(argv)
    try:
        if args.command == "watch":
            if not math.isfinite(args.until) or args.until <= 0:  # refuse rather than never fire
                parser.error(f"--until must be a Unix time, got {args.until}")
            wait_until(args.until)
        print(f"[cbvae] removing this pod{': ' + args.reason if args.reason else ''}", flush=True)
        return 0 if remove_this_pod(say=lambda line: print(line, flush=True)) else 1
    except CbvaeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
