"""End to end: the bundle's ``evaluate`` command on runs trained by the bundle (tiny dataset, 1 epoch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbvae_ext.evaluation import Evaluation, EvaluationError
from cbvae_ext.evaluation.metrics import pearson_r

pytestmark = pytest.mark.slow

FAST = ["--n_bootstrap", "200", "--n_permutations", "5", "--n_examples", "2", "--batch_size", "16"]


def _evaluate(repo_root: Path, dataset: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluate",
        "--config_file", "bundle/configs/evaluate.yaml",
        "--dataset_dir", str(dataset),
        "--output_dir", str(output),
        *FAST,
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def results(repo_root, tiny_dataset, tiny_runs, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval")
    proc = _evaluate(
        repo_root,
        tiny_dataset,
        out,
        "--run_dir",
        str(tiny_runs["cbvae"]),
        "--baseline_run_dir",
        str(tiny_runs["baseline"]),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "test_results.json").read_text()), out


def _check_summary(summary: dict, low: float, high: float) -> None:
    assert summary["n"] > 0 and summary["n_bootstrap"] == 200
    assert low <= summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1] <= high


def test_results_hold_every_metric_for_both_models(results, tiny_dataset):
    res, out = results
    n_test = res["n_test"]
    assert n_test > 0 and res["split"] == "test"
    for kind in ("cbvae", "baseline"):
        model = res["models"][kind]
        for name in ("pearson_r", "ssim"):
            _check_summary(model["reconstruction"][name], -1.0, 1.0)
            _check_summary(model["conditional_only"][name], -1.0, 1.0)
        for name in ("dice_top5", "dice_top1"):
            _check_summary(model["reconstruction"][name], 0.0, 1.0)
        elbo = model["elbo_beta1"]
        assert elbo["nll"]["mean"] > 0 and elbo["kl"]["mean"] >= 0
        assert elbo["elbo"]["mean"] == pytest.approx(-(elbo["nll"]["mean"] + elbo["kl"]["mean"]), rel=1e-6)
        for probe in ("logistic", "mlp"):
            p = model["probes"][probe]
            assert 0.0 <= p["balanced_accuracy"] <= 1.0 and len(p["null"]["values"]) == 5
            assert 1 / 6 <= p["p_value"] <= 1.0
    assert res["models"]["baseline"]["adversary"]["balanced_accuracy"] is None
    assert 0.0 <= res["models"]["cbvae"]["adversary"]["balanced_accuracy"] <= 1.0
    assert res["models"]["baseline"]["imputation"] == {"absent": "the baseline VAE has no imputation head"}
    imputation = res["models"]["cbvae"]["imputation"]
    assert imputation["year"]["n"] > 0 and imputation["year"]["mae"] >= 0
    assert imputation["field_strength"]["n"] == 0 and imputation["fwhm"]["n"] == 0  # never observed: no score
    assert res["baselines"]["pca"]["n_components"] == res["models"]["cbvae"]["latent_size"]
    assert set(res["figures"]) == {"recon_examples.png", "training_curves.png", "per_category_r.png", "probes.png"}
    for name in res["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_criteria_are_computed_from_the_results(results):
    res, _ = results
    crit, cb, base = res["criteria"], res["models"]["cbvae"], res["models"]["baseline"]
    elbo = crit["elbo_better_than_baseline"]
    assert elbo["value"] == cb["elbo_beta1"]["elbo"]["mean"] and elbo["reference"] == base["elbo_beta1"]["elbo"]["mean"]
    assert elbo["passed"] == (elbo["value"] > elbo["reference"])
    adv = crit["adversary_at_chance"]
    assert adv["reference"] == pytest.approx(0.15) and adv["passed"] == (adv["value"] <= 0.15)
    probe = crit["logistic_probe_below_baseline"]
    assert probe["passed"] == (
        cb["probes"]["logistic"]["balanced_accuracy"] < base["probes"]["logistic"]["balanced_accuracy"]
    )
    r = crit["r_above_pca"]
    assert r["reference"] == res["baselines"]["pca"]["reconstruction"]["pearson_r"]["mean"]
    assert r["passed"] == (r["value"] > r["reference"])
    prov = res["provenance"]
    assert len(prov["dataset_manifest_sha256"]) == 64 and prov["runs"]["cbvae"]["dataset_matches_training"] is True
    assert len(prov["runs"]["baseline"]["checkpoint_sha256"]) == 64 and prov["packages"]["torch"]


def test_mean_map_baseline_matches_a_direct_computation(results, tiny_dataset):
    from cbvae_ext.data import load_dataset_info

    res, _ = results
    info = load_dataset_info(tiny_dataset)
    mask = np.asarray(info.mask) != 0
    split = info.metadata["split"].to_numpy()
    maps = np.asarray(info.maps, dtype=np.float64)[:, mask]
    maps /= maps.max(axis=1, keepdims=True)
    test = maps[split == "test"]
    r = pearson_r(np.broadcast_to(maps[split == "train"].mean(axis=0), test.shape), test)
    assert res["baselines"]["mean_map"]["reconstruction"]["pearson_r"]["mean"] == pytest.approx(np.nanmean(r), abs=1e-4)
    assert res["n_test"] == int((split == "test").sum())


def test_missing_baseline_is_reported_absent(tiny_dataset, tiny_runs, tmp_path):
    res = Evaluation(
        tiny_dataset, tiny_runs["cbvae"], tmp_path, n_bootstrap=50, n_permutations=2, n_examples=0, batch_size=16
    ).run()
    assert res["models"]["baseline"] == {"absent": "no baseline run folder given"}
    crit = res["criteria"]["elbo_better_than_baseline"]
    assert crit["passed"] is None and crit["value"] is None and "baseline" in crit["reason"]
    assert res["criteria"]["mlp_probe_below_baseline"]["passed"] is None
    assert res["criteria"]["adversary_at_chance"]["passed"] is not None
    assert json.loads((tmp_path / "test_results.json").read_text())["n_test"] == res["n_test"]


def test_runs_that_do_not_belong_together(tiny_dataset, tiny_runs, tmp_path):
    with pytest.raises(EvaluationError, match="both run folders hold a 'cbvae' model"):
        Evaluation(tiny_dataset, tiny_runs["cbvae"], tmp_path, tiny_runs["cbvae"]).run()
    with pytest.raises(EvaluationError, match="give --run_dir"):
        Evaluation(tiny_dataset, None, tmp_path).run()
    assert not (tmp_path / "test_results.json").exists()


def test_mismatch_is_one_line_and_exit_2(tiny_dataset, tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["cbvae"], run)
    config = json.loads((run / "network_config.json").read_text())
    (run / "network_config.json").write_text(json.dumps({**config, "spatial_shape": [8, 8, 8]}))
    # run_cli is what the bundle's `evaluate` list calls (bundle/configs/evaluate.yaml)
    with pytest.raises(SystemExit) as exc:
        Evaluation(tiny_dataset, run, tmp_path / "eval").run_cli()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: grid mismatch") and "[8, 8, 8]" in err[0]
    assert not (tmp_path / "eval" / "test_results.json").exists()
