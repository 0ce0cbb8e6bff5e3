#!/usr/bin/env bash
# The cloud job: the pipeline of scripts/run_main.sh on a RunPod pod that bounds its own life.
# The Docker image's entrypoint; runs unchanged on any Linux machine with the project installed
# (no Docker needed). See bundle/docs/cloud.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/runpod_train.sh [--root DIR] [--keep-alive] [--deadline UNIX_TIME] [--linger S]
                               [PIPELINE OPTIONS] [--help]

Runs scripts/run_main.sh --no-setup --out DIR/output --data-dir DIR/dataset with the pipeline options
(below), then, with --keep-alive, keeps the pod up for the download and removes it. Options override
the environment variables in brackets:

  --root DIR            [CBVAE_ROOT] working folder; default /workspace/cbvae when /workspace is
                        writable (RunPod volume), else ./runs/cloud. DIR/dataset is the dataset (the
                        builder reuses it only for the same inputs and options); DIR/output holds
                        EVERYTHING the job produces (status.json, DONE|FAILED, logs/, run folders, eval/)
  --keep-alive          [CBVAE_KEEP_ALIVE=1] after the job, stay up for the download (a RunPod container
                        that exits is restarted), then remove the pod after --linger seconds
  --deadline UNIX_TIME  [CBVAE_DEADLINE] the pod removes itself at this time whatever happens to the
                        launcher (set by scripts/train_runpod.py from --max-hours/--max-cost)
  --linger S            [CBVAE_LINGER_S] seconds the pod stays up after the job (default 1800; never
                        past the deadline); the launcher usually terminates it sooner

Removing the pod needs RUNPOD_POD_ID and the pod-scoped RUNPOD_API_KEY, which RunPod sets in every pod;
without them (any other machine) --keep-alive sleeps forever and --deadline only warns. With them and
a deadline or --keep-alive, any other exit of this script (a refused option, a failure) removes the pod
at once: RunPod restarts a container that exits, and the watchdog ends with PID 1.
The pipeline options may also come from the pod environment: CBVAE_EPOCHS, CBVAE_SUBSET, CBVAE_PRESET,
CBVAE_RESOLUTION, CBVAE_KERNEL, CBVAE_KERNEL_FWHM, CBVAE_NEUROSYNTH_DIR. Other environment:
WANDB_API_KEY (online W&B logging; without it runs are logged offline: `wandb sync` them later),
PUBLIC_KEY (SSH key installed for root when sshd exists, as RunPod does), PYTHON (default python),
CBVAE_B64_<NAME> (base64 of a value the launcher could not pass verbatim; decoded into NAME).

USAGE
  "$(dirname "${BASH_SOURCE[0]}")/run_main.sh" --help | sed -e 's/^usage: /pipeline options: /'
}

# values the launcher had to encode for the RunPod GraphQL API (cbvae_ext.cloud.graphql_safety)
for var in $(compgen -e); do
  if [[ $var == CBVAE_B64_* ]]; then
    export "${var#CBVAE_B64_}=$(printf '%s' "${!var}" | base64 -d)"
    unset "$var"
  fi
done

root="${CBVAE_ROOT:-}"
keep_alive="${CBVAE_KEEP_ALIVE:-0}"
deadline="${CBVAE_DEADLINE:-}"
linger="${CBVAE_LINGER_S:-1800}"
pipeline=()
missing=""  # an option without its value: refused below, once an exit is known to remove a bounded pod
for pair in EPOCHS:--epochs SUBSET:--subset PRESET:--preset RESOLUTION:--resolution KERNEL:--kernel \
  KERNEL_FWHM:--kernel-fwhm NEUROSYNTH_DIR:--neurosynth-dir; do
  var="CBVAE_${pair%%:*}"
  if [ -n "${!var:-}" ]; then pipeline+=("${pair#*:}" "${!var}"); fi
done
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --keep-alive) keep_alive=1; shift ;;
    --root|--deadline|--linger)
      if [ $# -lt 2 ]; then missing="$1"; break; fi
      case "$1" in --root) root="$2" ;; --deadline) deadline="$2" ;; --linger) linger="$2" ;; esac
      shift 2 ;;
    *) pipeline+=("$1"); shift ;;
  esac
done
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
py="${PYTHON:-python}"
can_remove=0
if [ -n "${RUNPOD_POD_ID:-}" ] && [ -n "${RUNPOD_API_KEY:-}" ]; then can_remove=1; fi
watchdog=""
removed=0

# A pod asked to bound its life (a deadline, or --keep-alive) is removed on EVERY exit of this script: RunPod
# restarts a container that exits, and the exit of PID 1 kills the watchdog with it, so an exit (a refused
# option, a `set -e` failure, the job ending without --keep-alive) would otherwise leave the pod billing.
on_exit() {
  local rc=$?
  # a forked child (the watchdog's `&` before it execs python) still holds this trap: only the script removes
  [ "$BASHPID" = "$$" ] || exit "$rc"
  trap - EXIT
  set +e
  if [ -n "$watchdog" ]; then
    if kill -0 "$watchdog" 2>/dev/null; then kill "$watchdog" 2>/dev/null; else wait "$watchdog" && removed=1; fi
  fi
  if [ "$removed" != 1 ]; then
    echo "[cbvae] the entry script ends (exit $rc): removing this pod now"
    "$py" -m cbvae_ext.cloud.pod_deadline remove --reason "entry script ended (exit $rc)"
  fi
  exit "$rc"
}
if [ "$can_remove" = 1 ] && { [ -n "$deadline" ] || [ "$keep_alive" = 1 ]; }; then trap on_exit EXIT; fi

# every option is checked before the watchdog starts; the launcher refuses the same values before a pod exists
# (cbvae_ext.cloud.launcher.POD_VALUES)
bad() { echo "error: $*" >&2; exit 2; }
[ -z "$missing" ] || bad "$missing needs a value (see --help)"
[[ -z $deadline || $deadline =~ ^[1-9][0-9]{0,10}$ ]] || bad "--deadline must be a Unix time in seconds, got '$deadline'"
[[ $linger =~ ^(0|[1-9][0-9]{0,5})$ ]] || bad "--linger must be whole seconds from 0 to 999999, got '$linger'"
[[ $keep_alive == 0 || $keep_alive == 1 ]] || bad "CBVAE_KEEP_ALIVE must be 0 or 1, got '$keep_alive'"

# the pod's own limit, first of all: it holds whatever the job or the launcher does (kill -9, lost network);
# a restarted container (RunPod host restart) starts it again with the same absolute deadline
if [ -n "$deadline" ]; then
  if [ "$can_remove" = 1 ]; then
    echo "[cbvae] this pod removes itself at $(date -u -d "@$deadline" '+%F %T') UTC (deadline)"
    "$py" -m cbvae_ext.cloud.pod_deadline watch --until "$deadline" --reason "deadline reached" &
    watchdog=$!
  else
    echo "[cbvae] warning: a deadline without RUNPOD_POD_ID and RUNPOD_API_KEY: this machine cannot remove itself" >&2
  fi
fi
if [ -z "$root" ]; then
  if [ -d /workspace ] && [ -w /workspace ]; then root=/workspace/cbvae; else root="$repo_root/runs/cloud"; fi
fi
out="$root/output"
mkdir -p "$out"
export NIMARE_DATA="${NIMARE_DATA:-$root/nimare_data}"

# finish CODE: without --keep-alive exit (a bounded pod is removed by on_exit); else stay up for the download,
# then remove the pod
finish() {
  [ "$keep_alive" = 1 ] || exit "$1"
  if [ "$can_remove" = 0 ]; then
    echo "[cbvae] keeping the container alive for the download (nothing to remove: not a RunPod pod)"
    exec sleep infinity
  fi
  local until=$(($(date +%s) + linger)) rc=0
  if [ -n "$deadline" ] && [ "$deadline" -lt "$until" ]; then until=$deadline; fi
  if [ -n "$watchdog" ]; then kill "$watchdog" 2>/dev/null || true; watchdog=""; fi
  echo "[cbvae] keeping the pod up for the download until $(date -u -d "@$until" '+%F %T') UTC, then removing it"
  "$py" -m cbvae_ext.cloud.pod_deadline watch --until "$until" --reason "job ended (exit $1)" || rc=$?
  [ "$rc" != 0 ] || removed=1  # else on_exit tries once more
  exit "$rc"
}

# RunPod passes the account's SSH key as PUBLIC_KEY; images based on pytorch/pytorch have no sshd running
start_sshd() {
  if [ -n "${PUBLIC_KEY:-}" ] && command -v sshd >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    mkdir -p ~/.ssh && chmod 700 ~/.ssh
    grep -qxF "$PUBLIC_KEY" ~/.ssh/authorized_keys 2>/dev/null || printf '%s\n' "$PUBLIC_KEY" >> ~/.ssh/authorized_keys
    chmod 600 ~/.ssh/authorized_keys
    ssh-keygen -A >/dev/null
    mkdir -p /run/sshd
    "$(command -v sshd)" && echo "[cbvae] sshd started" || echo "[cbvae] warning: sshd did not start" >&2
  fi
}

start_sshd
if [ -f "$out/DONE" ]; then
  echo "[cbvae] $out/DONE exists: nothing to do (delete it to train again)"
  finish 0
fi
rm -f "$out/FAILED"
rc=0
"$repo_root/scripts/run_main.sh" --no-setup --out "$out" --data-dir "$root/dataset" "${pipeline[@]}" || rc=$?
if [ "$rc" != 0 ] && [ ! -f "$out/FAILED" ]; then  # refused before its first step (bad option)
  "$py" -m cbvae_ext.cloud.job_status "$out" failed options "exit code $rc; see the pod's log"
  touch "$out/FAILED"
fi
finish "$rc"
