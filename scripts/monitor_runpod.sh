#!/usr/bin/env bash
# Show a RunPod pod's status and the recent log lines of its training job.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/monitor_runpod.sh POD_ID [--lines N] [--watch SECONDS] [--ssh-key PATH] [--remote-root DIR]

Prints the pod's status (API: status, GPU, $/h, uptime, SSH endpoint), then over SSH the job's
status.json and the last N lines (default 30) of its newest step log under DIR/output/logs
(DIR default /workspace/cbvae). --watch repeats every SECONDS until Ctrl-C.
Keys: RUNPOD_API_KEY from the environment or .env (never printed).
USAGE
}

pod_id=""; lines=30; watch=0; ssh_key=""; remote_root=/workspace/cbvae
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --lines) lines="$2"; shift 2 ;;
    --watch) watch="$2"; shift 2 ;;
    --ssh-key) ssh_key="$2"; shift 2 ;;
    --remote-root) remote_root="$2"; shift 2 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) pod_id="$1"; shift ;;
  esac
done
[ -n "$pod_id" ] || { echo "error: POD_ID is required (see --help)" >&2; exit 2; }
[[ $lines =~ ^[0-9]+$ && $watch =~ ^[0-9]+$ ]] || { echo "error: --lines and --watch take whole numbers" >&2; exit 2; }
[[ $remote_root =~ ^[A-Za-z0-9_./-]+$ ]] || { echo "error: --remote-root may hold only letters, digits and _ . / -" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"

show() {
  local info host port
  info="$("$py" "$repo_root/scripts/train_runpod.py" --status "$pod_id")" || return 1
  printf '%s\n' "$info"
  host="$(printf '%s' "$info" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["ssh_host"] or "")')"
  port="$(printf '%s' "$info" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["ssh_port"] or "")')"
  if [ -z "$host" ]; then
    echo "(no public SSH port yet: the pod is starting)"
    return 0
  fi
  local ssh_cmd=(ssh -p "$port" -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o ConnectTimeout=15)
  [ -n "$ssh_key" ] && ssh_cmd+=(-i "$ssh_key")
  local out="$remote_root/output"
  # one remote shell: status, then the newest step log's tail
  "${ssh_cmd[@]}" "root@$host" "cat '$out/status.json' 2>/dev/null && echo; \
    log=\$(ls -t '$out'/logs/*.log 2>/dev/null | head -n 1); \
    if [ -n \"\$log\" ]; then echo \"== \$log\"; tail -n $lines \"\$log\"; else echo '(no logs yet)'; fi" \
    || echo "(SSH to root@$host:$port failed: sshd not up yet, or pass --ssh-key)"
}

if [ "$watch" -gt 0 ]; then
  while true; do clear 2>/dev/null || true; date; show || true; sleep "$watch"; done
else
  show
fi
