"""End to end: the bundle's ``evaluate`` command on runs trained by the bundle (tiny dataset, 1 epoch) and the real
NeuroStore n-back / flanker studyset as out-of-distribution maps."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_python

from cbvae_ext.evaluation import (
    PAIRED_CRITERIA,
    RESULTS_LAYOUT,
    RESULTS_LAYOUT_VERSION,
    Evaluation,
    EvaluationError,
    evaluate_criteria,
)
from cbvae_ext.evaluation.metrics import pearson_r
from cbvae_ext.evaluation.report import markdown_report
from cbvae_ext.evaluation.seeds import compare_seeds, seeds_report
from cbvae_ext.evaluation.seeds import main as seeds_main

pytestmark = pytest.mark.slow

FAST = [
    "--n_bootstrap", "200", "--n_permutations", "5", "--n_examples", "2", "--batch_size", "16",
    "--iwae_k", "3", "--n_prior_samples", "2", "--joint_k", "3", "--n_calibration_samples", "3",
    "--decoding_k", "2", "--decoding_n_terms", "10", "--decoding_max_maps", "8", "--qc_k", "2", "--qc_max_maps", "8",
    "--n_unseen_pairs", "1", "--ood_max_maps", "120",
]  # fmt: skip
SMALL = {
    "n_bootstrap": 50, "n_permutations": 2, "n_examples": 0, "batch_size": 16, "iwae_k": 2, "n_prior_samples": 2,
    "joint_k": 2, "n_calibration_samples": 2, "n_half_splits": 1, "decoding_k": 1, "decoding_n_terms": 5, "qc_k": 1,
    "n_unseen_pairs": 1,
}  # fmt: skip


def _evaluate(repo_root: Path, dataset: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        "-m", "monai.bundle", "run", "evaluate",
        "--config_file", "bundle/configs/evaluate.yaml",
        "--dataset_dir", str(dataset),
        "--output_dir", str(output),
        *FAST,
        *args,
    ]  # fmt: skip
    return run_python(cmd, cwd=repo_root, timeout=600)


@pytest.fixture(scope="module")
def ood_dataset(tmp_path_factory) -> Path:
    """The real NeuroStore n-back / flanker studyset shipped with NiMARE, on the tiny dataset's grid."""
    import nimare

    from cbvae_ext.data import build_dataset

    studyset = Path(nimare.__file__).parent / "resources" / "nback_vs_flanker_studyset_2026-07"
    out = tmp_path_factory.mktemp("ood") / "ood"
    return Path(build_dataset(neurosynth=False, neurostore_dirs=[studyset], out=out, resolution=4))


@pytest.fixture(scope="module")
def terms_dataset(tiny_dataset) -> Path:
    """The session's tiny dataset: built with NeuroQuery's text (terms.npz) by the real builder."""
    assert (tiny_dataset / "terms.npz").is_file()
    return tiny_dataset


@pytest.fixture(scope="module")
def results(repo_root, terms_dataset, tiny_runs, ood_dataset, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval")
    proc = _evaluate(
        repo_root,
        terms_dataset,
        out,
        "--run_dir",
        str(tiny_runs["cbvae"]),
        "--baseline_run_dir",
        str(tiny_runs["baseline"]),
        "--ood_dataset_dir",
        str(ood_dataset),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "evaluate.log").write_text(proc.stdout + proc.stderr)
    return json.loads((out / "test_results.json").read_text()), out


def test_the_evaluation_logs_each_section_and_its_time(results):
    res, out = results
    log = (out.parent / "evaluate.log").read_text()
    for name, seconds in res["provenance"]["section_seconds"].items():
        assert f"evaluation section {name} done in {seconds:.1f} s" in log, name


def test_every_option_on_the_command_line_reaches_the_evaluation(results):
    # evaluate.yaml once did not pass the decoding and QC options on: --qc_max_maps 8 scored every test map
    res, _ = results
    assert res["n_test"] > 8 and res["qc"]["n_maps"] == res["decoding"]["n_maps"] == 8
    # every section's own criteria reach the criteria table (the QC ones did not: looked up as "quality_control")
    for name in ("qc", "decoding", "protocols", "title_only", "unseen_pairs", "counterfactual"):
        if "absent" not in res[name]:
            missing = [k for k, v in res[name]["criteria"].items() if res["criteria"].get(k) != v]
            assert not missing, (name, missing)
    assert (
        res["provenance"]["evaluation_config"]["qc_k"] == 2
        and res["provenance"]["evaluation_config"]["decoding_n_terms"] == 10
    )


def _check_summary(summary: dict, low: float, high: float, n_bootstrap: int = 200) -> None:
    assert summary["n"] > 0 and summary["n_bootstrap"] == n_bootstrap
    assert low <= summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1] <= high


def test_results_layout_and_every_section(results):
    res, out = results
    assert res["layout"] == RESULTS_LAYOUT and res["layout_version"] == RESULTS_LAYOUT_VERSION == 2
    assert res["n_test"] > 0 and res["split"] == "test"
    cb, base = res["models"]["cbvae"], res["models"]["baseline"]
    for model in (cb, base):
        for name in ("pearson_r", "dice_top5", "dice_top1"):
            _check_summary(model["reconstruction"][name], -1.0, 1.0)
    _check_summary(cb["reconstruction"]["ssim"], -1.0, 1.0)
    for name in ("pearson_r", "dice_top5", "peak_auc"):
        _check_summary(cb["conditional_only"][name], -1.0, 1.0)
    assert cb["conditional_only"]["source"] in (
        "conditional-mean path of the network",
        "average of 2 decodes of z ~ N(0, I)",
    )
    assert res["models"]["uncond"] == {"absent": "no --uncond_run_dir given"}
    assert res["models"]["nolambda"] == {"absent": "no --nolambda_run_dir given"}
    assert cb["bounds"] == "log p(x | m)" and base["bounds"] == "log p(x)"
    assert base["adversary"]["balanced_accuracy"] is None and 0 <= cb["adversary"]["balanced_accuracy"] <= 1
    assert base["imputation"] == {"absent": "this network has no imputation head"}
    assert cb["imputation"]["year"]["n"] > 0 and cb["imputation"]["fwhm"]["n"] == 0  # never observed: no score
    # SSIM beside its trivial answers, and out of the criteria
    assert {"cbvae", "mean_map", "constant_map"} <= set(res["ssim"]) and res["ssim"]["criterion"] is False
    assert not any("ssim" in c.get("a", "") for c in res["criteria"].values())
    # PCA curve at L, 2L, 4L, 8L (as many as the tiny training split allows)
    latent = cb["latent_size"]
    assert res["pca_equivalent"]["dims"][0] == latent == res["baselines"]["pca"]["n_components"]
    assert [c["n_components"] for c in res["baselines"]["pca_curve"]] == res["pca_equivalent"]["dims"]
    eq = res["pca_equivalent"]["pearson_r"]
    assert (eq["components"] is None) == (eq["bound"] is not None)
    assert res["duplicates"]["n_near"] >= res["duplicates"]["n_exact"] >= 0
    cats = res["conditional_maps"]["categories"]
    assert cats["model"]["n_groups"] == cats["training_category_means"]["n_groups"] == len(cats["n_test"])
    assert (
        cats["model_centred"]["n_groups"] == cats["training_category_means_centred"]["n_groups"] == len(cats["n_test"])
    )
    assert res["missing_conditions"]["all"]["pearson_r"]["paired_vs_given"]["n"] == res["n_test"]
    assert {"year", "sample_size", "field_strength", "fwhm", "task"} <= set(res["missing_conditions"])
    assert res["debiasing"]["probes"]["data_ceiling"]["logistic"]["n_permutations"] == 5
    assert "predictions" not in res["debiasing"]["probes"]["cbvae"]["logistic"]
    figures = {
        "recon_examples.png", "training_curves.png", "per_category_r.png", "probes.png",
        "category_identification.png", "category_maps.png", "pca_curve.png", "calibration_reliability.png",
    }  # fmt: skip
    assert set(res["figures"]) == figures
    for name in res["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_likelihoods_in_one_currency(results):
    res, out = results
    table = pd.read_parquet(out / "per_map_test.parquet")
    assert len(table) == res["n_test"] and table["id"].is_unique
    floor = table["entropy_floor"].to_numpy()
    assert (floor > 0).all()
    for name in ("cbvae", "baseline"):
        iwae, elbo = table[f"{name}/loglik_iwae"].to_numpy(), table[f"{name}/loglik_elbo"].to_numpy()
        assert (iwae >= elbo - 1e-3).all()  # same samples: Jensen
        assert (-iwae - floor > 0).all()  # no bound beats the entropy floor
    lik = res["likelihood"]["models"]
    assert lik["mean_map"]["bounds"] == "log p(x)" and lik["category_mean"]["bounds"] == "log p(x | category)"
    assert lik["cbvae"]["excess_nll_iwae"]["mean"] == pytest.approx(
        -(table["cbvae/loglik_iwae"] + table["entropy_floor"]).mean(), rel=1e-6
    )


def test_criteria_recompute_from_the_per_map_table(results):
    res, out = results
    table = pd.read_parquet(out / "per_map_test.parquet").drop(columns=["id", "category"])
    latent = res["models"]["cbvae"]["latent_size"]
    again = evaluate_criteria(table, latent, 200, 0)
    for name in PAIRED_CRITERIA:
        crit = res["criteria"][name]
        if crit["passed"] is None:
            assert crit["reason"]
            continue
        assert again[name]["ci95"] == pytest.approx(crit["ci95"]) and again[name]["passed"] == crit["passed"]
        assert crit["passed"] == (crit["ci95"][0] > -crit["margin"])  # every recorded criterion claims "greater"
    assert res["criteria"]["conditioning_gain"]["reason"] == "no --uncond_run_dir given"
    assert res["criteria"]["logistic_probe_below_nolambda"]["reason"] == "no --nolambda_run_dir given"
    adv = res["criteria"]["adversary_at_chance"]
    assert adv["reference"] == pytest.approx(0.15) and adv["passed"] == (adv["value"] <= 0.15)
    ident = res["criteria"]["category_identification"]
    assert ident["passed"] == (ident["value"] >= ident["reference"])
    prov = res["provenance"]
    assert len(prov["dataset_manifest_sha256"]) == 64 and prov["runs"]["cbvae"]["dataset_matches_training"] is True
    assert len(prov["runs"]["baseline"]["checkpoint_sha256"]) == 64 and prov["packages"]["torch"]


def test_neuroquery_baseline_and_the_fields_protocols(results, terms_dataset):
    from cbvae_ext.data.neuroquery import load_terms

    res, out = results
    table = pd.read_parquet(out / "per_map_test.parquet")
    meta = pd.read_parquet(terms_dataset / "metadata.parquet").set_index("id")
    terms = load_terms(terms_dataset)
    has_text = terms.observed[meta.index.get_indexer(table["id"])]
    nq = res["neuroquery"]
    assert nq["n_test_with_text"] == has_text.sum() and nq["n_test_without_text"] == (~has_text).sum()
    assert nq["n_fit_maps"] == terms.observed[(meta["split"] == "train").to_numpy()].sum()
    assert 0 < nq["n_selected_terms"] <= len(terms.vocabulary)
    for metric in ("pearson_r", "peak_auc"):
        values = table[f"neuroquery/{metric}"].to_numpy()
        assert np.isfinite(values[has_text]).all() and np.isnan(values[~has_text]).all()  # text only, never invented
        _check_summary(nq[metric], -1.0, 1.0)
        # the criterion is paired on the studies with text, recomputable from the table
        crit = res["criteria"][
            {"pearson_r": "cond_only_r_above_neuroquery", "peak_auc": "peak_auc_above_neuroquery"}[metric]
        ]
        assert crit["n"] == has_text.sum() and crit["passed"] == (crit["ci95"][0] > 0)
        assert crit["mean_diff"] == pytest.approx(
            np.mean(table[f"cbvae/cond/{metric}"].to_numpy()[has_text] - values[has_text])
        )
    proto = res["protocols"]
    # trivial answers first: the training mean map is the log-likelihood's zero and Mitchell's chance
    assert proto["peak_loglik"]["mean_map"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert proto["mitchell"]["mean_map"]["accuracy"] == 0.5
    for name in ("cbvae/cond", "neuroquery", "category_mean", "topic_ridge"):
        assert 0.0 <= proto["mitchell"][name]["accuracy"] <= 1.0
        assert np.isfinite(proto["peak_loglik"][name]["mean"])
        assert f"{name}/mitchell" in table and f"{name}/peak_loglik" in table
    assert proto["mitchell"]["neuroquery"]["n_maps"] == has_text.sum()
    paired = proto["mitchell"]["model_vs_neuroquery_on_studies_with_text"]
    assert paired["n"] == has_text.sum() and paired["neuroquery_accuracy"] == pytest.approx(paired["mean_b"])
    title = res["title_only"]
    assert title["n_with_title"] == res["n_test"] and title["neuroquery"]["n_titles_with_a_term"] > 0
    assert title["cbvae"]["n_titles_matched"] > 0
    for prefix in ("neuroquery/title", "cbvae/title"):
        assert np.isfinite(table[f"{prefix}/peak_auc"]).all()
    assert "passed" in title["model_vs_neuroquery"]["peak_auc"]
    # the goals as criteria: Mitchell's 72 % and above NeuroQuery; title-only at least NeuroQuery's
    crit = res["criteria"]
    goal = crit["mitchell_at_least_0_72"]
    assert goal["value"] == proto["mitchell"]["cbvae/cond"]["accuracy"] and goal["passed"] == (goal["value"] >= 0.72)
    assert crit["mitchell_above_neuroquery"]["mean_diff"] == paired["mean_diff"]
    assert crit["mitchell_above_neuroquery"]["passed"] == (paired["ci95"][0] > 0)
    for metric in ("pearson_r", "peak_auc"):
        c = crit[f"title_only_{metric}_at_least_neuroquery"]
        assert c["mean_diff"] == pytest.approx(
            np.mean(table[f"cbvae/title/{metric}"].to_numpy() - table[f"neuroquery/title/{metric}"].to_numpy())
        )
        assert c["passed"] == (c["mean_diff"] >= 0) and c["superior"] == (c["ci95"][0] > 0)
    # the tiny test split has one map per category: no held-out mean to switch to, said so
    assert "absent" in res["counterfactual"] or res["counterfactual"]["n_studies"] > 0


def test_markdown_report_of_the_results(results):
    res, _ = results
    text = markdown_report(res)
    assert f"| C-β-VAE (z = μ) | {res['models']['cbvae']['reconstruction']['pearson_r']['mean']:.3f} [" in text
    assert "| r_above_pca |" in text and "log p(x \\| m)" in text  # pipes inside cells escaped
    assert text.count("| PCA, ") == len(res["baselines"]["pca_curve"])
    up = res["unseen_pairs"]
    if "absent" in up:
        assert f"Unseen pairs: absent ({up['absent']})." in text
    else:  # one row per pair, then the two medians, in one table
        assert text.count(f"| {' + '.join(up['pairs'][0]['terms'])} |") == 1
        assert "| median |  |" in text and "| median, pair-specific" in text


def _second_seed(out: Path, folder: Path, shift: float, flip: str) -> Path:
    """A copy of the evaluation ``out`` as if from another seed: reconstruction r shifted by ``shift`` on every
    map, the rows shuffled, and the criterion ``flip`` decided the other way."""
    shutil.copytree(out, folder)
    table = pd.read_parquet(folder / "per_map_test.parquet").sample(frac=1.0, random_state=0)
    table["cbvae/recon/pearson_r"] += shift
    table.to_parquet(folder / "per_map_test.parquet", index=False)
    res = json.loads((folder / "test_results.json").read_text())
    res["criteria"][flip]["passed"] = not res["criteria"][flip]["passed"]
    (folder / "test_results.json").write_text(json.dumps(res))
    return folder


def test_two_seeds_side_by_side(results, tmp_path):
    res, out = results
    other = _second_seed(out, tmp_path / "seed1", 0.05, "r_above_pca")
    cmp = compare_seeds(out, other, n_bootstrap=200)
    assert cmp["n_test"] == res["n_test"]
    decided = [n for n, c in res["criteria"].items() if c["passed"] is not None]
    assert cmp["n_decided"] == len(decided) and cmp["n_agree"] == len(decided) - 1
    assert cmp["criteria"]["r_above_pca"]["agree"] is False
    # joined by study id, not by row: the shuffled copy differs only where it was shifted
    recon = cmp["columns"]["cbvae/recon/pearson_r"]
    assert recon["mean_diff"] == pytest.approx(0.05) and recon["ci95"] == pytest.approx([0.05, 0.05])
    mean_a = pd.read_parquet(out / "per_map_test.parquet")["cbvae/recon/pearson_r"].mean()
    assert recon["mean_a"] == pytest.approx(mean_a) and recon["mean_b"] == pytest.approx(mean_a + 0.05)
    assert recon["differs"] is True
    others = {n: c for n, c in cmp["columns"].items() if n != "cbvae/recon/pearson_r" and c["mean_diff"] is not None}
    assert others and all(c["mean_diff"] == 0 and c["differs"] is False for c in others.values())
    assert all(n.startswith("cbvae/") for n in cmp["columns"])  # baselines do not depend on the seed
    text = seeds_report(cmp)
    assert f"{len(decided) - 1} of {len(decided)} criteria" in text
    assert "| r_above_pca |" in text and "| **no** |" in text
    assert "| cbvae/recon/pearson_r |" in text and "+0.05 [+0.05, +0.05] | **differs** |" in text


def test_two_seeds_of_different_splits_is_one_line(results, tmp_path, capsys):
    _, out = results
    other = _second_seed(out, tmp_path / "seed1", 0.0, "r_above_pca")
    table = pd.read_parquet(other / "per_map_test.parquet")
    table.iloc[1:].to_parquet(other / "per_map_test.parquet", index=False)
    assert seeds_main([str(out), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "different test splits" in err
    (other / "per_map_test.parquet").unlink()
    assert seeds_main([str(out), str(other / "test_results.json")]) == 2
    assert "per_map_test.parquet does not exist" in capsys.readouterr().err


def test_out_of_distribution_studyset(results):
    res, out = results
    ood = res["ood"]
    # a seeded subsample of the studyset's 896 maps (--ood_max_maps 120)
    assert ood["n_maps"] == 120 and ood["n_maps_in_studyset"] > 800
    assert ood["sources"] == ["neurostore:nback_vs_flanker_studyset_2026-07"]
    assert set(ood["categories"]) == {"working memory", "cognitive control"}
    _check_summary(ood["cbvae"]["recon/pearson_r"], -1.0, 1.0)
    imp = ood["sample_size_imputation"]
    assert imp["n"] > 0.9 * ood["n_maps"] and imp["mae"] > 0 and imp["median_mae"] > 0  # most report a sample size
    assert imp["reference"].startswith("median of the studyset")  # Neurosynth has no sample sizes
    table = pd.read_parquet(out / "per_map_ood.parquet")
    assert len(table) == ood["n_maps"] and "cbvae/cond/pearson_r" in table


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
    assert res["baselines"]["mean_map"]["pearson_r"]["mean"] == pytest.approx(np.nanmean(r), abs=1e-4)
    assert res["n_test"] == int((split == "test").sum())


def test_missing_baseline_is_reported_absent(tiny_dataset, tiny_runs, tmp_path):
    # another run's results in the folder; Neurosynth maps as "OOD" have no sample size anywhere, so the
    # imputation's reference median is NaN: it used to fail json.dumps after the whole run, beside a new table
    out = tmp_path / "eval"
    out.mkdir()
    (out / "test_results.json").write_text('{"run": "old"}')
    (out / "per_map_ood.parquet").write_bytes(b"old")
    res = Evaluation(
        tiny_dataset, tiny_runs["cbvae"], out, ood_dataset_dir=tiny_dataset, neuroquery="false", **SMALL
    ).run()
    assert res["models"]["baseline"] == {"absent": "no --baseline_run_dir given"}
    crit = res["criteria"]["baseline_iwae_above_mean_map"]
    assert crit["passed"] is None and crit["reason"] == "no --baseline_run_dir given"
    assert res["criteria"]["r_above_pca"]["passed"] is not None
    written = json.loads((out / "test_results.json").read_text())
    assert written["n_test"] == res["n_test"]
    assert written["ood"]["sample_size_imputation"]["median_value"] is None  # NaN as JSON null
    assert len(pd.read_parquet(out / "per_map_ood.parquet")) == written["ood"]["n_maps"]  # the new run's table
    # NeuroQuery switched off: it and everything it feeds reported absent, never an error
    assert res["neuroquery"]["absent"] == "switched off (--neuroquery false)"
    for name in ("peak_auc_above_neuroquery", "cond_only_r_above_neuroquery"):
        assert res["criteria"][name]["passed"] is None
        assert res["criteria"][name]["reason"] == "switched off (--neuroquery false)"
    assert "neuroquery" not in res["protocols"]["mitchell"] and res["title_only"]["neuroquery"]["absent"]
    assert res["protocols"]["mitchell"]["cbvae/cond"]["n_maps"] == res["n_test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no partial folder left


def test_runs_that_do_not_belong_together(tiny_dataset, tiny_runs, tmp_path):
    with pytest.raises(EvaluationError, match="--baseline_run_dir .* holds a 'cbvae' model"):
        Evaluation(tiny_dataset, None, tmp_path, tiny_runs["cbvae"]).run()
    with pytest.raises(EvaluationError, match="--run_dir .* holds a 'baseline' model.*--baseline_run_dir"):
        Evaluation(tiny_dataset, tiny_runs["baseline"], tmp_path).run()
    with pytest.raises(EvaluationError, match="--uncond_run_dir and --run_dir are the same folder"):
        Evaluation(tiny_dataset, tiny_runs["cbvae"], tmp_path, uncond_run_dir=tiny_runs["cbvae"]).run()
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
    assert len(err) == 1 and err[0].startswith("error: ") and "spatial_shape [8, 8, 8]" in err[0]
    assert not (tmp_path / "eval" / "test_results.json").exists()
