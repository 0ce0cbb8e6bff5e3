#!/usr/bin/env bash
# The one pipeline: build the dataset -> train the C-β-VAE, the baseline VAE (and the model's twins once
# their overlays exist) -> evaluate them on the held-out test split. Training exports the decoder.
# Run locally (`bash scripts/run_main.sh`); a cloud pod runs it through scripts/runpod_train.sh.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/run_main.sh [--out DIR] [--data-dir DIR] [--subset N|all] [--epochs N] [--preset gpu|cpu]
                           [--resolution 2|4] [--kernel ale|mkda] [--kernel-fwhm MM] [--neurosynth-dir DIR]
                           [--networks LIST] [--no-terms] [--term-dims N] [--term-embedding svd|neuroquery] [--no-setup] [--help]

Always calls the dataset builder: it reuses DATA only when inputs, options, schema and version match its
cache key, and rebuilds otherwise (a changed kernel, subset or metadata field never trains on old maps).
The dataset carries NeuroQuery's term tf-idf (terms.npz) for the evaluation's NeuroQuery baseline.
Options override the environment variables in brackets:

  --out DIR             [OUT_ROOT] everything the job writes (default ./runs):
                          DIR/status.json        {"state","step","message","updated"} (a cloud launcher polls it)
                          DIR/DONE | DIR/FAILED  end markers
                          DIR/logs/<step>.log    output of each step
                          DIR/logs/step_times.tsv wall and CPU seconds (user, sys) of each step
                          DIR/cbvae, DIR/baseline (DIR/uncond, DIR/nolambda)  run folders
                          DIR/eval/              test_results.json and figures
  --data-dir DIR        dataset folder (default DIR/data_<subset>)
  --subset N|all        [SUBSET] number of studies (default: all with a GPU, else 1000)
  --epochs N            [EPOCHS] training epochs (default: 100 with a GPU, else 10)
  --preset gpu|cpu      training preset (default: gpu when torch sees CUDA, else cpu); gpu adds the
                        overlay bundle/configs/preset_gpu.yaml
  --resolution 2|4      voxel size in mm of the dataset (default 4)
  --kernel ale|mkda     kernel that turns peaks into maps (default ale)
  --kernel-fwhm MM      ALE kernel FWHM in mm (default: the builder's); --fwhm is an alias
  --neurosynth-dir DIR  [CBVAE_NEUROSYNTH_DIR] local Neurosynth v7 (default ../shared/data/neurosynth
                        when present, else NiMARE's fetcher downloads it)
  --no-terms            [CBVAE_TERMS=0] build without NeuroQuery's terms (the evaluation then reports NeuroQuery absent)
  --term-dims N         [CBVAE_TERM_DIMS] the terms condition: a text embedding of N entries (default 0: none;
                        architecture.md, Text condition)
  --term-embedding K    [CBVAE_TERM_EMBEDDING] how it is fitted: svd (default) or neuroquery (NeuroQuery's
                        cross-fitted regression of the training maps; about 36 min more on the full database)
  --neuroquery-dir DIR  [CBVAE_NEUROQUERY_DIR] local NeuroQuery term counts (default ../shared/data/neuroquery
                        when present, else NiMARE's fetcher downloads them)
  --networks LIST       [CBVAE_NETWORKS] comma-separated networks to train and evaluate (default
                        cbvae,baseline,uncond,nolambda: the model, the baseline VAE and the model's two twins;
                        cbvae is always trained: the export check and the app need it)
  --no-setup            use $PYTHON (default python) as it is; default: create ./.venv and install

Extra bundle overrides: CBVAE_TRAIN_ARGS (every training) and CBVAE_EVAL_ARGS (the evaluation), split
on spaces, e.g. CBVAE_TRAIN_ARGS="--lr 0.0005".
USAGE
}

bad() { echo "error: $*" >&2; exit 2; }

out="${OUT_ROOT:-}"
data_dir=""
subset="${SUBSET:-}"
epochs="${EPOCHS:-}"
preset=""
resolution=4
kernel=ale
kernel_fwhm=""
ns_dir="${CBVAE_NEUROSYNTH_DIR:-}"
nq_dir="${CBVAE_NEUROQUERY_DIR:-}"
terms="${CBVAE_TERMS:-1}"
term_dims="${CBVAE_TERM_DIMS:-0}"
term_embedding="${CBVAE_TERM_EMBEDDING:-svd}"
networks="${CBVAE_NETWORKS:-cbvae,baseline,uncond,nolambda}"
setup=1
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-setup) setup=0; shift; continue ;;
    --no-terms) terms=0; shift; continue ;;
    --out|--data-dir|--subset|--epochs|--preset|--resolution|--kernel|--kernel-fwhm|--fwhm|--neurosynth-dir|--neuroquery-dir|--networks|--term-dims|--term-embedding)
      [ $# -ge 2 ] || bad "$1 needs a value (see --help)" ;;
    *) bad "unknown option $1 (see --help)" ;;
  esac
  case "$1" in
    --out) out="$2" ;;
    --data-dir) data_dir="$2" ;;
    --subset) subset="$2" ;;
    --epochs) epochs="$2" ;;
    --preset) preset="$2" ;;
    --resolution) resolution="$2" ;;
    --kernel) kernel="$2" ;;
    --kernel-fwhm|--fwhm) kernel_fwhm="$2" ;;
    --neurosynth-dir) ns_dir="$2" ;;
    --neuroquery-dir) nq_dir="$2" ;;
    --networks) networks="$2" ;;
    --term-dims) term_dims="$2" ;;
    --term-embedding) term_embedding="$2" ;;
  esac
  shift 2
done
[[ -z $epochs || $epochs =~ ^[1-9][0-9]*$ ]] || bad "--epochs must be a positive integer, got '$epochs'"
[[ -z $subset || $subset == all || $subset =~ ^[1-9][0-9]*$ ]] || bad "--subset must be a positive integer or all, got '$subset'"
[[ -z $preset || $preset == gpu || $preset == cpu ]] || bad "--preset must be gpu or cpu, got '$preset'"
[[ $resolution == 2 || $resolution == 4 ]] || bad "--resolution must be 2 or 4, got '$resolution'"
[[ $kernel == ale || $kernel == mkda ]] || bad "--kernel must be ale or mkda, got '$kernel'"
[[ -z $kernel_fwhm || $kernel_fwhm =~ ^[0-9]+([.][0-9]+)?$ ]] || bad "--kernel-fwhm must be a number of mm, got '$kernel_fwhm'"
[[ -z $ns_dir || -d $ns_dir ]] || bad "--neurosynth-dir $ns_dir does not exist; omit it to download Neurosynth"
[[ $terms == 0 || $terms == 1 ]] || bad "CBVAE_TERMS must be 0 or 1, got '$terms'"
[[ $term_dims =~ ^[0-9]+$ ]] || bad "--term-dims must be a whole number >= 0, got '$term_dims'"
[[ $term_embedding == svd || $term_embedding == neuroquery ]] || bad "--term-embedding must be svd or neuroquery, got '$term_embedding'"
[[ $networks =~ ^(cbvae|baseline|uncond|nolambda)(,(cbvae|baseline|uncond|nolambda))*$ && ,$networks, == *,cbvae,* ]] \
  || bad "--networks must be a comma-separated list of cbvae, baseline, uncond, nolambda that includes cbvae, got '$networks'"
[[ -z $nq_dir || -d $nq_dir ]] || bad "--neuroquery-dir $nq_dir does not exist; omit it to download NeuroQuery's term counts"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if [ "$setup" = 1 ]; then
  source scripts/setup_env.sh
  py=python
else
  py="${PYTHON:-python}"
fi
if [ -z "$ns_dir" ] && [ -f "$repo_root/../shared/data/neurosynth/data-neurosynth_version-7_coordinates.tsv.gz" ]; then
  ns_dir="$repo_root/../shared/data/neurosynth"
fi
if [ -z "$preset" ]; then
  preset=$("$py" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi
[ -n "$subset" ] || subset=$([ "$preset" = gpu ] && echo all || echo 1000)
[ -n "$epochs" ] || epochs=$([ "$preset" = gpu ] && echo 100 || echo 10)
out="${out:-$repo_root/runs}"
data_dir="${data_dir:-$out/data_$subset}"
# OpenMP threads that spin while waiting cost up to 9x on a busy CPU (scripts/bench_train.py; set it to override)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p "$out/logs"
rm -f "$out/DONE" "$out/FAILED"
source scripts/step_times.sh
step_times_start "$out/logs/step_times.tsv"  # kept across reruns: a resumed job appends its steps

# run one step: output to the console and logs/<name>.log, its wall and CPU time in logs/step_times.tsv,
# progress in status.json; a failure ends the job
step() {
  local name="$1"; shift
  echo "[main] $name: $*"
  "$py" -m cbvae_ext.cloud.job_status "$out" running "$name" "$*"
  local rc=0
  step_time_begin
  # the console gets the live progress bars; the log keeps each line's final state (no \r-joined bars)
  # (fd 3 is the console; tee appends to it so a redirected console file is never truncated)
  { "$@" 2>&1 | tee -a /dev/fd/3 | sed -u 's/.*\r//' > "$out/logs/$name.log" || rc=${PIPESTATUS[0]}; } 3>&1
  step_time_end "$out/logs/step_times.tsv" "$name"
  if [ "$rc" != 0 ]; then
    "$py" -m cbvae_ext.cloud.job_status "$out" failed "$name" "exit code $rc; see logs/$name.log"
    touch "$out/FAILED"
    echo "[main] $name failed with exit code $rc; log: $out/logs/$name.log" >&2
    exit "$rc"
  fi
}

echo "[main] out=$out data=$data_dir subset=$subset epochs=$epochs preset=$preset" \
  "resolution=${resolution}mm kernel=$kernel${kernel_fwhm:+ fwhm=${kernel_fwhm}mm}"
build=("$py" -m cbvae_ext.data build --out "$data_dir" --resolution "$resolution" --kernel "$kernel")
[ -n "$kernel_fwhm" ] && build+=(--kernel-fwhm "$kernel_fwhm")
[ -n "$ns_dir" ] && build+=(--neurosynth-dir "$ns_dir")
if [ "$terms" = 1 ]; then
  if [ -n "$nq_dir" ]; then build+=(--neuroquery-dir "$nq_dir"); else build+=(--terms); fi
  build+=(--term-dims "$term_dims" --term-embedding "$term_embedding")
fi
[ "$subset" != all ] && build+=(--subset "$subset")
step dataset "${build[@]}"

read -ra extra_train <<< "${CBVAE_TRAIN_ARGS:-}"
read -ra extra_eval <<< "${CBVAE_EVAL_ARGS:-}"
train_args=(--dataset_dir "$data_dir" --epochs "$epochs" "${extra_train[@]}")
presets="'bundle/configs/train.yaml'"  # the CPU preset; the GPU one is an overlay
[ "$preset" = gpu ] && presets+=",'bundle/configs/preset_gpu.yaml'"
runs=()
# train NAME [OVERLAY]: the run folder OUT/NAME from train.yaml, the preset (+ bundle/configs/OVERLAY); evaluated below
train() {
  local name="$1" configs="$presets"
  [[ ,$networks, == *,$name,* ]] || return 0
  [ $# -gt 1 ] && configs+=",'bundle/configs/$2'"
  step "train_$name" "$py" -m monai.bundle run training --config_file "[$configs]" --output_dir "$out/$name" "${train_args[@]}"
  runs+=("$name")
}
train cbvae
train baseline train_baseline.yaml
# the twins (conditioning off; λ = 0) are trained once their overlays exist
if [ -f bundle/configs/train_uncond.yaml ]; then train uncond train_uncond.yaml; fi
if [ -f bundle/configs/train_nolambda.yaml ]; then train nolambda train_nolambda.yaml; fi
# training exports the decoder; a missing file means the export step silently did nothing
step check_decoder test -s "$out/cbvae/decoder.ts" -a -s "$out/cbvae/decoder_schema.json"

eval_args=(--dataset_dir "$data_dir" --output_dir "$out/eval")
for name in "${runs[@]}"; do  # cbvae -> --run_dir, any other run NAME -> --NAME_run_dir
  if [ "$name" = cbvae ]; then eval_args+=(--run_dir "$out/cbvae"); else eval_args+=("--${name}_run_dir" "$out/$name"); fi
done
step evaluate "$py" -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml "${eval_args[@]}" "${extra_eval[@]}"

"$py" -m cbvae_ext.cloud.job_status "$out" done evaluate "outputs in $out"
touch "$out/DONE"
# the numbers, readable (the same tables as bundle/docs/README.md's results)
[ -s "$out/eval/test_results.json" ] && "$py" -m cbvae_ext.evaluation.report "$out/eval/test_results.json" || echo "[main] the report could not be printed; see $out/eval/test_results.json" >&2
streamlit_bin=streamlit
[ "$setup" = 1 ] && streamlit_bin=.venv/bin/streamlit
echo "[main] done: results in $out/eval/test_results.json; demo:" \
  "$streamlit_bin run app/streamlit_app.py --server.address 127.0.0.1 -- --run_dir $out/cbvae --dataset_dir $data_dir"
