#!/usr/bin/env bash
# The cloud training job: dataset -> C-β-VAE -> baseline VAE -> evaluation, every output in one folder.
# The Docker image's entrypoint, and runs unchanged on any Linux machine with the repo checked out and
# the project installed (no Docker needed). See bundle/docs/cloud.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/runpod_train.sh [--root DIR] [--epochs N] [--subset N|all] [--preset gpu|cpu]
                               [--neurosynth-dir DIR] [--keep-alive] [--help]

Builds (or reuses) the dataset, trains the C-β-VAE and the baseline with
`python -m monai.bundle run training`, evaluates both on the test split; training exports
the decoder (decoder.ts). Options override the environment variables in brackets:

  --root DIR            [CBVAE_ROOT] working folder; default /workspace/cbvae when /workspace is
                        writable (RunPod volume), else ./runs/cloud. Layout:
                          DIR/dataset_<subset>_<res>mm/  the dataset (reused when its manifest.json exists)
                          DIR/output/             EVERYTHING the job produces:
                            status.json           {"state","step","message","updated"} polled by the launcher
                            DONE | FAILED         end markers
                            runs/cbvae, runs/baseline  run folders (model.pt, decoder.ts, history.csv, wandb/, ...)
                            eval/                 evaluation results
                            logs/<step>.log       output of each step
  --epochs N            [CBVAE_EPOCHS] training epochs (default: the preset's)
  --subset N|all        [CBVAE_SUBSET] number of studies (default: all)
  --preset gpu|cpu      [CBVAE_PRESET] training preset (default: gpu when nvidia-smi sees a GPU, else cpu)
  --resolution 2|4      [CBVAE_RESOLUTION] voxel size in mm of the dataset (default: the builder's, 4)
  --neurosynth-dir DIR  [CBVAE_NEUROSYNTH_DIR] local Neurosynth v7; default: NiMARE downloads it
                        into DIR/nimare_data (NIMARE_DATA) once
  --keep-alive          [CBVAE_KEEP_ALIVE=1] sleep after finishing, so the pod stays up for the download
                        (a RunPod container that exits is restarted); the launcher terminates the pod

Other environment: WANDB_API_KEY (online W&B logging to the project of local runs, the bundle's
experiment_name "cbvae"; without it runs are logged offline: `wandb sync runs/<name>/wandb/offline-run-*`
later), PUBLIC_KEY (SSH key installed for
root when sshd exists, as RunPod does), PYTHON (default python), CBVAE_TRAIN_ARGS / CBVAE_EVAL_ARGS
(extra bundle overrides for both trainings / the evaluation, split on spaces, e.g. "--lr 0.0005"),
CBVAE_B64_<NAME> (base64 of a value the launcher could not pass verbatim; decoded into NAME).
USAGE
}

# values the launcher had to encode for the RunPod GraphQL API (cbvae_ext.cloud.graphql_safety)
for var in $(compgen -e); do
  if [[ $var == CBVAE_B64_* ]]; then
    export "${var#CBVAE_B64_}=$(printf '%s' "${!var}" | base64 -d)"
    unset "$var"
  fi
done

root="${CBVAE_ROOT:-}"
epochs="${CBVAE_EPOCHS:-}"
subset="${CBVAE_SUBSET:-all}"
preset="${CBVAE_PRESET:-}"
resolution="${CBVAE_RESOLUTION:-4}"
ns_dir="${CBVAE_NEUROSYNTH_DIR:-}"
keep_alive="${CBVAE_KEEP_ALIVE:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --root) root="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --subset) subset="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --resolution) resolution="$2"; shift 2 ;;
    --neurosynth-dir) ns_dir="$2"; shift 2 ;;
    --keep-alive) keep_alive=1; shift ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -z $epochs || $epochs =~ ^[1-9][0-9]*$ ]] || { echo "error: --epochs must be a positive integer, got '$epochs'" >&2; exit 2; }
[[ $subset == all || $subset =~ ^[1-9][0-9]*$ ]] || { echo "error: --subset must be a positive integer or all, got '$subset'" >&2; exit 2; }
[[ -z $preset || $preset == gpu || $preset == cpu ]] || { echo "error: --preset must be gpu or cpu, got '$preset'" >&2; exit 2; }
[[ $resolution == 2 || $resolution == 4 ]] || { echo "error: --resolution must be 2 or 4, got '$resolution'" >&2; exit 2; }
[[ -z $ns_dir || -d $ns_dir ]] || { echo "error: --neurosynth-dir $ns_dir does not exist; omit it to download Neurosynth" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
py="${PYTHON:-python}"
if [ -z "$root" ]; then
  if [ -d /workspace ] && [ -w /workspace ]; then root=/workspace/cbvae; else root="$repo_root/runs/cloud"; fi
fi
if [ -z "$preset" ]; then
  if nvidia-smi -L >/dev/null 2>&1; then preset=gpu; else preset=cpu; fi
fi
out="$root/output"
data_dir="$root/dataset_${subset}_${resolution}mm"
mkdir -p "$out/logs" "$out/runs"
export NIMARE_DATA="${NIMARE_DATA:-$root/nimare_data}"
# W&B project = the bundle's experiment_name (cbvae), as in local runs; files under runs/<name>/wandb
if [ -n "${WANDB_API_KEY:-}" ]; then export WANDB_MODE=online; else export WANDB_MODE=offline; fi

# status.json is what the launcher polls over SSH: write it atomically (JSON-escaped by python)
status() {
  "$py" - "$out/status.json" "$@" <<'PY'
import json, os, sys, time
path, state, step, message = sys.argv[1], sys.argv[2], sys.argv[3], " ".join(sys.argv[4:])
with open(path + ".tmp", "w") as f:
    json.dump({"state": state, "step": step, "message": message, "updated": time.time()}, f)
os.replace(path + ".tmp", path)
PY
}

stay_up() {
  if [ "$keep_alive" = 1 ]; then
    echo "[cbvae] keeping the container alive for the download (the launcher terminates the pod)"
    exec sleep infinity
  fi
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

# run one step, its output to the console and logs/<name>.log; a failure marks the job failed
step() {
  local name="$1"; shift
  echo "[cbvae] $name: $*"
  status running "$name" "$*"
  local rc=0
  "$@" 2>&1 | tee "$out/logs/$name.log" || rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    status failed "$name" "exit code $rc; see logs/$name.log"
    touch "$out/FAILED"
    echo "[cbvae] $name failed with exit code $rc; log: $out/logs/$name.log" >&2
    stay_up
    exit "$rc"
  fi
}

start_sshd
if [ -f "$out/DONE" ]; then
  echo "[cbvae] $out/DONE exists: nothing to do (delete it to train again)"
  stay_up
  exit 0
fi
rm -f "$out/FAILED"
echo "[cbvae] root=$root preset=$preset subset=$subset resolution=${resolution}mm epochs=${epochs:-default}" \
  "wandb=$WANDB_MODE"

read -ra extra_train <<< "${CBVAE_TRAIN_ARGS:-}"
read -ra extra_eval <<< "${CBVAE_EVAL_ARGS:-}"
train_args=(--dataset_dir "$data_dir" --preset "$preset" --use_wandb true)
[ -n "$epochs" ] && train_args+=(--epochs "$epochs")
train_args+=("${extra_train[@]}")

if [ -f "$data_dir/manifest.json" ]; then
  echo "[cbvae] reusing dataset $data_dir"
else
  build=("$py" -m cbvae_ext.data build --out "$data_dir" --resolution "$resolution")
  [ -n "$ns_dir" ] && build+=(--neurosynth-dir "$ns_dir")
  [ "$subset" != all ] && build+=(--subset "$subset")
  step dataset "${build[@]}"
fi
step train_cbvae "$py" -m monai.bundle run training --config_file bundle/configs/train.yaml \
  --output_dir "$out/runs/cbvae" "${train_args[@]}"
step train_baseline "$py" -m monai.bundle run training \
  --config_file "['bundle/configs/train.yaml','bundle/configs/train_baseline.yaml']" \
  --output_dir "$out/runs/baseline" "${train_args[@]}"
step evaluate "$py" -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml \
  --dataset_dir "$data_dir" --run_dir "$out/runs/cbvae" --baseline_run_dir "$out/runs/baseline" --output_dir "$out/eval" "${extra_eval[@]}"
# training exports the decoder; a missing file means the export step silently did nothing
step check_decoder test -s "$out/runs/cbvae/decoder.ts" -a -s "$out/runs/cbvae/decoder_schema.json"

status done evaluate "outputs in $out"
touch "$out/DONE"
echo "[cbvae] done: outputs in $out"
stay_up
