"""Markdown tables of a ``test_results.json`` (the bundle README's results section is pasted from this).

python -m cbvae_ext.evaluation.report EVAL/test_results.json   (or the folder EVAL)

A missing, truncated or foreign file, or one of another layout version, ends in one ``error:`` line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cbvae_ext.errors import CbvaeError
from cbvae_ext.evaluation import RESULTS_LAYOUT, RESULTS_LAYOUT_VERSION

__all__ = [
    "ReportError",
    "criterion_cells",
    "load_results",
    "main",
    "markdown_report",
    "markdown_table",
    "print_or_fail",
]

RESULTS = "test_results.json"
_RERUN = "rerun the evaluation: python -m monai.bundle run evaluate --config_file bundle/configs/evaluate.yaml"


class ReportError(CbvaeError, ValueError):
    """A results file that is missing, unreadable or not a ``test_results.json`` of this layout version."""


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and check a ``test_results.json`` (or the evaluation folder holding one).

    Raises:
        ReportError: the file is missing, not JSON, not an object, or of another layout or version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist; {_RERUN}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is unreadable ({type(err).__name__}: {err}); {_RERUN}") from None
    try:
        res = json.loads(text)
    except RecursionError:
        raise ReportError(f"{path} is nested too deeply to be a {RESULTS}; {_RERUN}") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not complete JSON ({err}); {_RERUN}") from None
    if not isinstance(res, dict):
        raise ReportError(f"{path} holds a JSON {type(res).__name__}, not a {RESULTS} object; {_RERUN}")
    layout, version = res.get("layout"), res.get("layout_version")
    if layout != RESULTS_LAYOUT or version != RESULTS_LAYOUT_VERSION:
        raise ReportError(
            f"{path} has layout {layout!r} version {version!r} but this cbvae_ext reads {RESULTS_LAYOUT!r} "
            f"version {RESULTS_LAYOUT_VERSION} (bundle/docs/formats.md); {_RERUN}"
        )
    return res


def _ci(summary: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not summary or summary.get("mean") is None:
        return "—"
    lo, hi = summary["ci95"]
    return f"{summary['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; pipes inside cells are escaped."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    body = ("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    return "\n".join([*lines, *body])


def criterion_cells(c: Mapping[str, Any]) -> tuple[str, str]:
    """A criterion's value (paired mean difference [95% CI], or value vs reference) and its result."""
    if c.get("passed") is None:
        return "—", f"n/a ({c.get('reason')})"
    result = "passed" if c["passed"] else "**failed**"
    if "mean_diff" in c:
        lo, hi = c["ci95"]
        return f"{c['mean_diff']:+.4g} [{lo:+.4g}, {hi:+.4g}]", result
    return f"{_num(c['value'])} vs {_num(c['reference'])}", result


def markdown_report(res: Mapping[str, Any]) -> str:
    """The results as markdown: reconstruction, likelihoods, conditional maps, de-biasing, criteria."""
    out = []
    prov = res.get("provenance", {})
    out.append(
        f"Test split: {res['n_test']} maps ({res['n_train']} train). Machine: {prov.get('machine', '?')}, "
        f"device {prov.get('device', '?')}, started {prov.get('started_utc', '?')}, {prov.get('elapsed_s', '?')} s."
    )
    rows = []
    for m in res["models"].values():
        if "absent" in m:
            continue
        rec = m["reconstruction"]
        rows.append(
            [m["label"] + " (z = μ)", *(_ci(rec.get(k)) for k in ("pearson_r", "dice_top5", "dice_top1", "ssim"))]
        )
        if "conditional_only" in m:
            c = m["conditional_only"]
            rows.append(
                [
                    m["label"] + " conditional-only",
                    *(_ci(c.get(k)) for k in ("pearson_r", "dice_top5", "dice_top1")),
                    "—",
                ]
            )
    base = res["baselines"]
    for c in base["pca_curve"]:
        rows.append(
            [
                f"PCA, {c['n_components']} components",
                *(_ci(c.get(k)) for k in ("pearson_r", "dice_top5", "dice_top1", "ssim")),
            ]
        )
    for key, label in (
        ("mean_map", "training mean map"),
        ("category_mean", "category mean map"),
        ("topic_ridge", "LDA50 topic ridge"),
    ):
        b = base.get(key, {})
        if "absent" not in b:
            rows.append([label, *(_ci(b.get(k)) for k in ("pearson_r", "dice_top5", "dice_top1", "ssim"))])
    rows.append(["constant map", "—", "—", "—", _ci(base["constant_map"].get("ssim"))])
    out.append(markdown_table(["model / baseline", "Pearson r", "Dice top 5%", "Dice top 1%", "SSIM (mask)"], rows))

    lik = res["likelihood"]
    rows = [
        [
            m["label"],
            m["bounds"],
            m["bound"],
            _ci(m.get("loglik_iwae") or m.get("loglik"), 0),
            _ci(m.get("excess_nll_iwae") or m.get("excess_nll"), 0),
        ]
        for m in lik["models"].values()
    ]
    out.append(f"Likelihoods (nats/map; entropy floor {_ci(lik['entropy_floor'], 0)}):")
    out.append(markdown_table(["model", "bounds", "bound", "log-likelihood", "NLL above the floor"], rows))

    eq = res.get("pca_equivalent", {})
    if "absent" not in eq:
        parts = []
        for m in ("pearson_r", "dice_top5", "dice_top1"):
            e = eq[m]
            parts.append(
                f"{m}: "
                + (
                    f"{e['components']:.0f}"
                    if e["components"]
                    else f"{e['bound']} {eq['dims'][0 if e['bound'] == 'below' else -1]}"
                )
            )
        out.append("PCA-equivalent dimension (components matching the model): " + "; ".join(parts) + ".")

    cm = res.get("conditional_maps", {})
    if "absent" not in cm:
        cats = cm["categories"]
        out.append(
            f"Category identification ({cm['source']}): {cats['model']['n_correct']} of {cats['model']['n_groups']} "
            f"categories (training category means: {cats['training_category_means']['n_correct']}); with the "
            f"training mean map subtracted from every map: {cats['model_centred']['n_correct']} "
            f"(training category means: {cats['training_category_means_centred']['n_correct']})."
        )
        topics = cm.get("topics", {})
        if "model" in topics:
            out.append(
                f"Topic identification: {topics['model']['n_correct']} of {topics['model']['n_groups']} dominant topics."
            )

    out.extend(_protocol_report(res))
    out.extend(_generative_report(res))
    out.extend(_decoding_qc_report(res))

    deb = res.get("debiasing", {})
    rows = []
    for name, probes in deb.get("probes", {}).items():
        if "skipped" in probes:
            continue
        cells = [
            f"{probes[p]['balanced_accuracy']:.3f} (null 95th {probes[p]['null']['p95']:.3f}, p = {probes[p]['p_value']:.2f})"
            if probes[p]["null"]["p95"] is not None
            else f"{probes[p]['balanced_accuracy']:.3f}"
            for p in ("logistic", "mlp")
        ]
        r2 = deb["year_r2"].get(name)
        rows.append([name, *cells, "—" if r2 is None else f"{r2:.3f}"])
    if rows:
        out.append(markdown_table(["year probes on", "logistic", "MLP", "year R²"], rows))

    rows = [[name, c["rule"], *criterion_cells(c)] for name, c in res["criteria"].items()]
    out.append(markdown_table(["criterion", "rule", "paired mean difference [95% CI]", "result"], rows))

    dup, miss = res.get("duplicates", {}), res.get("missing_conditions", {})
    out.append(
        f"Duplicates: {dup.get('n_exact')} test maps identical to a training map, {dup.get('n_near')} with r > "
        f"{dup.get('threshold_r')}."
    )
    if "absent" not in miss:
        hidden = ", ".join(
            f"{k} {v['pearson_r']['paired_vs_given']['mean_diff']:+.3f}"
            for k, v in miss.items()
            if isinstance(v, dict) and "pearson_r" in v
        )
        out.append(f"Reconstruction r with a condition hidden, minus given (paired): {hidden}.")
    ood = res.get("ood", {})
    if "absent" not in ood:
        imp = ood.get("sample_size_imputation", {})
        out.append(
            f"Out of distribution ({ood['n_maps']} NeuroStore maps): reconstruction r {_ci(ood['cbvae'].get('recon/pearson_r'))}, "
            f"conditional-only r {_ci(ood['cbvae'].get('cond/pearson_r'))} vs category mean "
            f"{_ci(ood['category_mean'].get('pearson_r'))}; sample-size imputation ρ {_num(imp.get('spearman_rho'))}, "
            f"MAE {_num(imp.get('mae'))} vs {_num(imp.get('median_mae'))} ({imp.get('reference')})."
        )
    return "\n\n".join(out) + "\n"


def _protocol_report(res: Mapping[str, Any]) -> list[str]:
    """NeuroQuery beside the model and the baselines under the field's protocols, title-only, counterfactuals."""
    proto = res.get("protocols")
    if proto is None:  # results written before these sections
        return []
    base, nq = res["baselines"], res.get("neuroquery", {})
    cond = res["models"].get("cbvae", {}).get("conditional_only", {})
    scores = {
        "cbvae/cond": ("C-β-VAE conditional-only", cond),
        "neuroquery": (f"NeuroQuery ({nq.get('n_test_with_text', 0)} test studies with text)", nq),
        "category_mean": ("category mean map", base.get("category_mean", {})),
        "topic_ridge": ("LDA50 topic ridge", base.get("topic_ridge", {})),
        "mean_map": ("training mean map", base.get("mean_map", {})),
    }
    rows = []
    for key, (label, s) in scores.items():
        if "absent" in s or not s:
            continue
        mitchell = proto["mitchell"].get(key)
        rows.append(
            [
                label,
                _ci(s.get("pearson_r")),
                _ci(s.get("peak_auc")),
                _ci(proto["peak_loglik"].get(key), 2),
                "—" if mitchell is None else f"{mitchell['accuracy']:.3f} ({mitchell['n_pairs']} pairs)",
            ]
        )
    out = [
        markdown_table(["predictor (test split)", "Pearson r", "peak AUC", "peak log-lik. vs mean", "Mitchell"], rows)
    ]
    if "absent" in nq:
        out.append(f"NeuroQuery: absent ({nq['absent']}).")
    title = res.get("title_only", {})
    parts = [
        f"{name} r {_ci(title[name].get('pearson_r'))}, peak AUC {_ci(title[name].get('peak_auc'))}"
        for name in ("cbvae", "neuroquery")
        if name in title and "absent" not in title[name]
    ]
    if parts:
        out.append(f"Title only ({title['n_with_title']} titles): " + "; ".join(parts) + ".")
    out.extend(_unseen_pairs_report(res.get("unseen_pairs", {})))
    cf = res.get("counterfactual", {})
    if "absent" in cf:
        out.append(f"Counterfactual direction: absent ({cf['absent']}).")
    elif cf:
        g, c = cf["generated"], cf["conditional_mean"]
        out.append(
            f"Counterfactual direction ({cf['n_studies']} held-out studies, {cf['n_changes']} task switches): "
            f"generated change vs the held-out mean difference median r {_num(g['median_r'])}, size ratio "
            f"{_num(g['median_size_ratio'])}; conditional mean's change median r {_num(c['median_r'])}, size ratio "
            f"{_num(c['median_size_ratio'])}"
            + (
                f"; the training category means' own difference (the literature's reference) median r "
                f"{_num(cf['training_category_means']['median_r'])}"
                if "training_category_means" in cf
                else ""
            )
            + "."
        )
        lit = cf.get("against_training_means")
        if lit:
            out.append(
                f"Against the training means' difference instead (no held-out noise): generated median r "
                f"{_num(lit['generated']['median_r'])}, conditional mean {_num(lit['conditional_mean']['median_r'])}."
            )
    return out


def _unseen_pairs_report(up: Mapping[str, Any]) -> list[str]:
    """One row per removed term pair: r with the removed studies' mean map, unseen and seen."""
    if not up:
        return []
    if "absent" in up:
        return [f"Unseen pairs: absent ({up['absent']})."]
    band, keys = up["band"], ("cbvae", "neuroquery", "mean_map", "cbvae_seen", "neuroquery_seen")
    rows = [[" + ".join(p["terms"]), str(p["n_removed"]), *(_num(p[k]) for k in keys)] for p in up["pairs"]]
    rows.append(["median", "", *(_num(up["median_r"][k]) for k in keys)])
    specific = up["specific"]["median_r"]
    rows.append(
        ["median, pair-specific (reduced training mean subtracted)", "", *(_num(specific.get(k, 0.0)) for k in keys)]
    )
    header = ["pair", "removed", "C-β-VAE", "NeuroQuery", "training mean", "C-β-VAE seen", "NeuroQuery seen"]
    return [
        f"Unseen term pairs ({up['n_pairs']} pairs co-occurring in {band['studies'][0]}–{band['studies'][1]} of "
        f"{band['of_training_studies_with_text']} training studies with text; those studies removed, both predictors "
        "refitted; r with the removed studies' mean map):",
        markdown_table(header, rows),
    ]


def _generative_report(res: Mapping[str, Any]) -> list[str]:
    """Completion from half of each study's peaks, the joint peak likelihood and the calibration of peak probabilities."""
    out: list[str] = []
    comp = res.get("completion")
    if comp is not None and "absent" in comp:
        out.append(f"Completion: absent ({comp['absent']}).")
    elif comp is not None:
        rows = []
        for key, p in comp["predictors"].items():
            vs = comp["model_vs"].get(key, {}).get("completion_auc")
            paired = (
                "—"
                if vs is None or vs.get("mean_diff") is None
                else (f"{vs['mean_diff']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]")
            )
            rows.append([p["label"], _ci(p.get("completion_auc")), _ci(p.get("completion_r")), paired])
        out.append(
            f"Completion from a random half of each study's peak voxels ({comp['n_studies']} test studies, "
            f"{comp['n_half_splits']} splits; the given half left out of the AUC):"
        )
        out.append(
            markdown_table(["predictor", "AUC of the other half", "r with the full map", "C-β-VAE − it (AUC)"], rows)
        )
    joint = res.get("joint_peak_likelihood")
    if joint is not None and "absent" in joint:
        out.append(f"Joint peak likelihood: absent ({joint['absent']}).")
    elif joint is not None:
        ps, gs, gp = joint["per_study"], joint["gain_per_study"], joint["gain_per_peak"]

        def gain(g: Mapping[str, Any]) -> str:
            return (
                "—"
                if g.get("mean_diff") is None
                else f"{g['mean_diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
            )

        out.append(
            f"Joint peak likelihood ({joint['n_studies']} test studies, k = {joint['joint_k']}, nats per study): "
            f"joint {_ci(ps['joint'], 1)}, conditional mean (independent peaks) {_ci(ps['conditional_mean'], 1)}, "
            f"training mean {_ci(ps['training_mean'], 1)}; gain over the conditional mean {gain(gs['vs_conditional_mean'])} "
            f"per study, {gain(gp['vs_conditional_mean'])} per peak; over the training mean "
            f"{gain(gs['vs_training_mean'])} per study."
        )
    cal = res.get("calibration")
    if cal is not None and "absent" in cal:
        out.append(f"Calibration: absent ({cal['absent']}).")
    elif cal is not None:
        parts = [f"{p['label']} {p['ece']:.4f}" for p in cal["predictors"].values()]
        out.append(
            f"Calibration of the per-voxel peak probability ({cal['n_studies']} test studies, event rate "
            f"{cal['event_rate_test']:.4f} = the ECE of predicting 0): ECE " + "; ".join(parts) + "."
        )
    return out


def _decoding_qc_report(res: Mapping[str, Any]) -> list[str]:
    """The Bayesian decoder beside NiMARE's CorrelationDecoder, and the quality-control AUC per corruption."""
    out = []
    dec = res.get("decoding", {})
    if "absent" in dec:
        out.append(f"Decoding: absent ({dec['absent']}).")
    elif dec:
        rows = []
        cats = dec.get("categories", {})
        if "absent" not in cats:
            for m, label in (("top1", "own category, top 1"), ("top5", "own category, top 5")):
                rows.append(
                    [
                        f"{label} ({cats['n_candidates']} categories)",
                        _ci(cats["model"][m]),
                        _ci(cats["correlation_decoder"][m]),
                        _num(cats["prior_only"][m]),
                        _num(cats["chance"][m]),
                    ]
                )
        terms = dec.get("terms", {})
        if "absent" not in terms:
            rows.append(
                [
                    f"own top-5 terms in top 10 ({terms['n_candidates']} terms)",
                    _ci(terms["model"]),
                    _ci(terms["correlation_decoder"]),
                    _ci(terms["prior_only"]),
                    _num(terms["chance"]),
                ]
            )
        header = [
            "decoding (test split)",
            "C-β-VAE Bayesian decoder",
            "NiMARE CorrelationDecoder",
            "prior only",
            "chance",
        ]
        out.append(markdown_table(header, rows))
    qc = res.get("quality_control", {})
    if "absent" in qc:
        out.append(f"Quality control: absent ({qc['absent']}).")
    elif qc:
        rows = []
        for kind, c in qc["corruptions"].items():
            lo, hi = c["ci95"]
            auc = "—" if c["auc"] is None else f"{c['auc']:.3f} [{lo:.3f}, {hi:.3f}]"
            rows.append([kind, auc, _num(c["median_percentile"]), _ci(c["score_drop_nats"], 1)])
        out.append(markdown_table(["corruption", "ROC AUC [95% CI]", "median percentile", "score drop (nats)"], rows))
        sym = qc["corruptions"].get("flip_x", {}).get("nearly_symmetric")
        if sym:
            out.append(
                f"Flipped x: {sym['n']} of {qc['n_maps']} studies are nearly symmetric (r(clean, flipped) > 0.9); "
                f"AUC without them {_num(sym['auc_without']['auc'])}."
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: print the report of one results file; one ``error:`` line and exit 2 on bad input."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m cbvae_ext.evaluation.report EVAL/test_results.json", file=sys.stderr)
        return 2

    def text() -> str:
        res = load_results(args[0])
        try:
            return markdown_report(res)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
            # the layout version matched but a section has the wrong shape: edited or damaged by hand
            raise ReportError(
                f"{args[0]} does not have the {RESULTS} layout version {RESULTS_LAYOUT_VERSION} "
                f"({type(err).__name__}: {str(err)[:120]}); {_RERUN}"
            ) from None

    return print_or_fail(text, ReportError)


def print_or_fail(make: Callable[[], str], errors: type[Exception] | tuple[type[Exception], ...]) -> int:
    """A command line's end: print what ``make`` returns and exit 0, or one ``error:`` line and exit 2 on ``errors``."""
    try:
        text = make()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
