#!/usr/bin/env bash
# One prepared GPU check, about 10 minutes on one H100/H200: install, build full Neurosynth v7, measure the
# GPU preset's training throughput (scripts/bench_train.py: maps/s, bf16, peak memory), then train the four
# networks (C-β-VAE, its conditioning-off and λ = 0 twins, the baseline) and evaluate them together
# (scripts/run_main.sh), everything under one folder. --tiny runs the same steps on CPU in about a minute
# (fixture data, a tiny network, 2 iterations per epoch): the test of this script.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/gpu_check.sh [--out DIR] [--epochs N] [--data-dir DIR] [--neurosynth-dir DIR] [--tiny]
                            [--no-setup] [--help]

  --out DIR             [GPU_CHECK_OUT] everything it writes (default ./runs/gpu_check):
                          DIR/summary.txt     the figures: device, throughput, peak memory, wall/CPU time per step
                          DIR/step_times.tsv  wall and CPU seconds (user, sys) of each step
                          DIR/env.txt         torch, CUDA and device versions
                          DIR/bench_train.txt bench_train.py's output
                          DIR/main/           run_main.sh's folder: run folders, logs/, eval/test_results.json
  --epochs N            [GPU_CHECK_EPOCHS] epochs of each training (default 5 on a GPU, 1 with --tiny)
  --data-dir DIR        dataset folder (default DIR/main/data_<subset>; an existing build is reused)
  --neurosynth-dir DIR  local Neurosynth v7 (default: as run_main.sh; --tiny: tests/data/neurosynth)
  --tiny                CPU smoke run: fixture data (120 studies), CPU preset, tiny network, 1 epoch of 2
                        iterations, a quick evaluation; the figures are then meaningless
  --no-setup            use $PYTHON (default python) as it is; default: scripts/setup_env.sh (./.venv)

Extra bundle overrides go through run_main.sh's CBVAE_TRAIN_ARGS / CBVAE_EVAL_ARGS (appended after
this script's own).
USAGE
}

bad() { echo "error: $*" >&2; exit 2; }

out="${GPU_CHECK_OUT:-}"
epochs="${GPU_CHECK_EPOCHS:-}"
data_dir=""
ns_dir=""
tiny=0
setup=1
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tiny) tiny=1; shift; continue ;;
    --no-setup) setup=0; shift; continue ;;
    --out|--epochs|--data-dir|--neurosynth-dir) [ $# -ge 2 ] || bad "$1 needs a value (see --help)" ;;
    *) bad "unknown option $1 (see --help)" ;;
  esac
  case "$1" in
    --out) out="$2" ;;
    --epochs) epochs="$2" ;;
    --data-dir) data_dir="$2" ;;
    --neurosynth-dir) ns_dir="$2" ;;
  esac
  shift 2
done
[[ -z $epochs || $epochs =~ ^[1-9][0-9]*$ ]] || bad "--epochs must be a positive integer, got '$epochs'"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
setup_s=0
if [ "$setup" = 1 ]; then
  source scripts/setup_env.sh
  setup_s=$SECONDS
  py=python
else
  py="${PYTHON:-python}"
fi
py="$(command -v "$py")" || bad "no Python interpreter '${PYTHON:-python}'; set PYTHON or drop --no-setup"
device=cpu
if [ "$tiny" = 0 ]; then
  device=cuda
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || bad "torch sees no CUDA device here; run on a GPU machine, or add --tiny for the CPU smoke run"
fi

out="${out:-$repo_root/runs/gpu_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

# timed NAME CMD...: run CMD with its output in DIR/NAME.txt (and the console), its wall and CPU time in
# DIR/step_times.tsv and the summary; a failure ends the check
source scripts/step_times.sh
times_file="$out/step_times.tsv"
rm -f "$times_file"
step_times_start "$times_file"
timed() {
  local name="$1"; shift
  local rc=0
  step_time_begin
  "$@" 2>&1 | tee "$out/$name.txt" || rc=${PIPESTATUS[0]}
  step_time_end "$times_file" "$name"
  note "$name: wall, CPU user, CPU sys $(tail -1 "$times_file" | cut -f2- | tr '\t' ' ') s; exit $rc"
  [ "$rc" = 0 ] || { echo "[gpu_check] $name failed; see $out/$name.txt" >&2; exit "$rc"; }
}

main_args=(--no-setup --out "$out/main")
[ -n "$data_dir" ] && main_args+=(--data-dir "$data_dir")
train_args=()
eval_args=()
if [ "$tiny" = 1 ]; then
  # OpenMP threads that spin while waiting make a CPU shared with other jobs several times slower
  # (a CPU-preset train step, 2 threads on a busy 2-core machine: 3.3 maps/s spinning, 30 passive)
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  [ -n "$ns_dir" ] || ns_dir="$repo_root/tests/data/neurosynth"
  main_args+=(--preset cpu --subset 120 --epochs "${epochs:-1}")
  # no spaces inside a value: run_main.sh splits CBVAE_TRAIN_ARGS on spaces
  train_args=(--epoch_length 2 --val_epoch_length 1 --batch_size 4 --progress false --use_wandb false
              --use_mlflow false --network_overrides "{'channels':[4,8],'block_layers':[1],'growth_rate':4}")
  eval_args=(--n_bootstrap 20 --n_permutations 5 --iwae_k 2 --n_prior_samples 2 --max_train_maps 100
             --n_counterfactual 1 --n_half_splits 1 --joint_k 2 --n_calibration_samples 2 --decoding_k 1
             --decoding_n_terms 5 --decoding_max_maps 6 --qc_k 1 --qc_max_maps 6 --n_unseen_pairs 1)
  bench=(--preset cpu --device cpu --steps 1 --warmup 0 --batch-size 2 --decode-maps 1)
else
  main_args+=(--preset gpu --subset all --epochs "${epochs:-5}")
  # the GPU preset keeps the whole training split resident: the bench allocates as many maps
  bench=(--preset gpu --device cuda --steps 50 --warmup 5 --resident-maps 11500)
fi
[ -n "$ns_dir" ] && main_args+=(--neurosynth-dir "$ns_dir")

"$py" - > "$out/env.txt" <<'PY'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  {p.total_memory / 1024**3:.0f} GiB  bf16 {torch.cuda.is_bf16_supported()}")
else:
    print(f"device cpu  {torch.get_num_threads()} threads")
PY
note "[gpu_check] $(date -u +%FT%TZ) out=$out device=$device tiny=$tiny"
note "$(cat "$out/env.txt")"
[ "$setup" = 1 ] && note "setup (scripts/setup_env.sh): wall $setup_s s"

timed bench_train "$py" scripts/bench_train.py "${bench[@]}"
note "$(grep -E '^(device|preset|train step|peak)' "$out/bench_train.txt")"

# run_main.sh: dataset build -> the four trainings -> one evaluation (its per-step logs and times under
# main/logs/; a rerun into the same folder appends to main/logs/step_times.tsv, so only this run's rows are copied)
main_times="$out/main/logs/step_times.tsv"
main_rows=$( [ -s "$main_times" ] && wc -l < "$main_times" || echo 1 )
PYTHON="$py" CBVAE_TRAIN_ARGS="${train_args[*]} ${CBVAE_TRAIN_ARGS:-}" \
  CBVAE_EVAL_ARGS="${eval_args[*]} ${CBVAE_EVAL_ARGS:-}" timed run_main bash scripts/run_main.sh "${main_args[@]}"
tail -n +"$((main_rows + 1))" "$main_times" >> "$times_file"
note "per step (seconds):"
note "$(column -t -s $'\t' "$times_file" 2>/dev/null || cat "$times_file")"
note "results: $out/main/eval/test_results.json"
note "[gpu_check] done in $SECONDS s"
