#!/usr/bin/env bash
# The main job: set up ./.venv, build the dataset, train the C-β-VAE and the baseline VAE with the
# MONAI bundle, evaluate both on the held-out test split. The decoder is exported by training.
#
# Environment (all optional):
#   CBVAE_NEUROSYNTH_DIR  local Neurosynth v7 copy; unset -> ../shared/data/neurosynth if present,
#                         else NiMARE's fetcher downloads it into ~/.nimare
#   SUBSET                number of studies (default 1000 on CPU, the full database on a GPU; "all" = full)
#   EPOCHS                training epochs (default 10 on CPU, 100 on GPU)
#   OUT_ROOT              where data/, runs/ and eval/ go (default ./runs)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
source scripts/setup_env.sh

out_root="${OUT_ROOT:-$repo_root/runs}"
has_gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))")
subset="${SUBSET:-$([ "$has_gpu" = 1 ] && echo all || echo 1000)}"
epochs="${EPOCHS:-$([ "$has_gpu" = 1 ] && echo 100 || echo 10)}"
ns_dir="${CBVAE_NEUROSYNTH_DIR:-}"
if [ -z "$ns_dir" ] && [ -f "$repo_root/../shared/data/neurosynth/data-neurosynth_version-7_coordinates.tsv.gz" ]; then
  ns_dir="$repo_root/../shared/data/neurosynth"
fi

data_dir="$out_root/data_$subset"
build=(python -m cbvae_ext.data build --out "$data_dir")
[ -n "$ns_dir" ] && build+=(--neurosynth-dir "$ns_dir")
[ "$subset" != all ] && build+=(--subset "$subset")
echo "[main] 1/4 dataset -> $data_dir"
"${build[@]}"

echo "[main] 2/4 C-β-VAE -> $out_root/cbvae"
python -m monai.bundle run training --config_file bundle/configs/train.yaml \
  --dataset_dir "$data_dir" --output_dir "$out_root/cbvae" --epochs "$epochs"
echo "[main] 3/4 baseline VAE -> $out_root/baseline"
python -m monai.bundle run training --config_file "['bundle/configs/train.yaml','bundle/configs/train_baseline.yaml']" \
  --dataset_dir "$data_dir" --output_dir "$out_root/baseline" --epochs "$epochs"
echo "[main] 4/4 evaluation -> $out_root/eval"
python -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml \
  --dataset_dir "$data_dir" --run_dir "$out_root/cbvae" --baseline_run_dir "$out_root/baseline" \
  --output_dir "$out_root/eval"
echo "[main] done: results in $out_root/eval/test_results.json; demo: streamlit run app/streamlit_app.py -- --run_dir $out_root/cbvae"
