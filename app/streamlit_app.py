"""The Counterfactual Machine: explore a trained C-β-VAE decoder by moving latents and conditions.

Run with ``streamlit run app/streamlit_app.py [-- --run_dir RUN --dataset_dir DATA]`` (or the environment
variables ``CBVAE_RUN_DIR`` / ``CBVAE_DATASET_DIR``); the default run is ``runs/cbvae`` as written by
``scripts/run_main.sh``. See ``bundle/docs/app.md``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import streamlit.components.v1 as components

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `streamlit run` without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from cbvae_ext import app_logic as al  # noqa: E402
from cbvae_ext.schema import CONTINUOUS_FIELDS, SchemaError  # noqa: E402

__all__: list[str] = []

logger = logging.getLogger("cbvae.app")
DEFAULT_CUT = (0.0, -18.0, 18.0)
UNKNOWN = "unknown (model imputes)"


# ----- cached resources (one per run folder and file version) -------------------------------------


def _stamp(run_dir: Path) -> float:
    files = [run_dir / name for name in al.RUN_FILES]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


@st.cache_resource(show_spinner="Reading the run…", max_entries=4)
def load_info(run_dir: str, stamp: float) -> al.RunInfo:
    return al.load_run_info(Path(run_dir))


@st.cache_resource(show_spinner="Loading the decoder…", max_entries=4)
def load_model(run_dir: str, stamp: float) -> Any:
    import torch

    from cbvae_ext import inference

    # one map per call: a single thread decodes in ~18 ms, while two OpenMP threads stall when the
    # machine is busy (spin-waiting), which broke the 300 ms budget under load
    torch.set_num_threads(1)
    return inference.load(run_dir)


@st.cache_resource(show_spinner="Resampling the MNI152 template…", max_entries=4)
def load_renderer(run_dir: str, stamp: float) -> al.SliceRenderer:
    info = load_info(run_dir, stamp)
    return al.SliceRenderer(info.affine, info.mask.shape, info.mask)


@st.cache_resource(show_spinner="Opening the dataset…", max_entries=2)
def load_dataset(dataset_dir: str) -> Any:
    return al.load_dataset_rows(Path(dataset_dir))


Query = tuple  # (z, sorted condition items, allow_extrapolation, sorted imputed items): hashable for the caches


def make_query(z: np.ndarray, conditions: dict[str, Any], allow: bool, imputed: dict[str, float]) -> Query:
    return (tuple(float(v) for v in z), tuple(sorted(conditions.items())), bool(allow), tuple(sorted(imputed.items())))


@st.cache_resource(max_entries=32)
def decode_cached(run_dir: str, stamp: float, query: Query) -> Any:
    """``DecodeResult`` of one query; cached so that moving cuts or thresholds does not decode again."""
    z, conditions, allow, imputed = query
    model = load_model(run_dir, stamp)
    return model.decode(np.asarray(z, np.float32), dict(conditions), allow_extrapolation=allow, imputed=dict(imputed))


@st.cache_resource(max_entries=16)
def sweep_cached(run_dir: str, stamp: float, query: Query, years: tuple[int, ...]) -> list[np.ndarray]:
    """The query's maps over ``years``, decoded in one batch."""
    z, conditions, _, imputed = query
    conds = [{**dict(conditions), "year": float(y)} for y in years]
    model = load_model(run_dir, stamp)
    results = model.decode_many(np.asarray(z, np.float32), conds, allow_extrapolation=True, imputed=dict(imputed))
    return [r.map for r in results]


@st.cache_resource(max_entries=64)
def study_imputed(run_dir: str, stamp: float, dataset_dir: str, study_id: str) -> tuple[dict[str, float], str | None]:
    """The imputation head's values for a real study's missing fields (``encode`` of its real map), and a note
    when they cannot be computed (then the model's defaults are used)."""
    data = load_dataset(dataset_dir)
    if data is None:
        return {}, None
    maps, meta = data
    rows = np.flatnonzero(meta["id"].to_numpy() == study_id)
    if not rows.size:
        return {}, f"study {study_id} is not in the dataset {dataset_dir}"
    try:
        _, _, imputed = load_model(run_dir, stamp).encode(np.asarray(maps[int(rows[0])]), {}, return_imputed=True)
    except (ValueError, OSError, RuntimeError) as err:
        return {}, f"per-study imputation unavailable ({err})"
    return imputed, None


@st.cache_resource(max_entries=8)
def viewer_html(run_dir: str, stamp: float, query: Query, threshold: float, vmax: float, cut: tuple) -> str:
    """nilearn's brainsprite viewer of the map, standalone HTML (its scripts are inline: works offline)."""
    from nilearn.plotting import view_img

    img = decode_cached(run_dir, stamp, query).to_nifti()
    bg = load_renderer(run_dir, stamp).template_img  # already on the map grid: no 1 mm resampling
    doc = view_img(
        img, bg_img=bg, threshold=threshold, vmax=vmax, symmetric_cmap=False, cmap="hot",
        cut_coords=cut, black_bg=False, resampling_interpolation="nearest", title="Generated map",
    )  # fmt: skip
    return doc.get_standalone()


@st.cache_resource
def freeze_gc() -> bool:
    """Move the long-lived objects (torch, nilearn, caches) out of the collector's reach: nilearn calls
    ``gc.collect()`` on every image access, which otherwise costs ~0.5 s per call in this process."""
    gc.collect()
    gc.freeze()
    return True


# ----- state helpers ------------------------------------------------------------------------------


def apply_start(
    info: al.RunInfo, start: al.StartPoint, imputed: dict[str, float], latents: bool = True, conditions: bool = True
) -> None:
    """Put the widgets on a starting point (callback of the reset buttons and of a new start)."""
    state = st.session_state
    if latents:
        for d in range(info.latent_size):
            state[f"z{d}"] = float(start.z[d])
    if conditions:
        state["task"] = start.conditions["task"] or UNKNOWN
        for name in CONTINUOUS_FIELDS:
            value = start.conditions[name]
            state[f"{name}_unknown"] = value is None
            fallback = imputed.get(name, info.imputed_defaults[name])
            state[f"{name}_value"] = al.slider_value(info.schema, name, fallback if value is None else value)


def read_query_params(info: al.RunInfo) -> dict[str, Any]:
    """Initial state from the URL (``?study=ID`` or ``?seed=N``, ``&task=NAME&year=YYYY``), once per session,
    so that a view can be shared or reproduced (the documentation screenshot is made this way)."""
    params, state = st.query_params, st.session_state
    if "study" in params and params["study"] in set(info.latents["id"]):
        state["study"] = params["study"]
    elif "seed" in params and params["seed"].isdigit():
        state["mode"], state["seed"] = "Prior sample", int(params["seed"])
    overrides: dict[str, Any] = {}
    if params.get("task") in info.schema.categories:
        overrides["task"] = params["task"]
    try:
        overrides["year_value"] = al.slider_value(info.schema, "year", float(params["year"]))
        overrides["year_unknown"] = False
    except (KeyError, ValueError):
        pass
    return overrides


def set_cut(cut: tuple[float, float, float]) -> None:
    for axis, value in zip("xyz", cut, strict=True):
        st.session_state[f"cut_{axis}"] = float(value)


# ----- page sections ------------------------------------------------------------------------------


def pick_start(info: al.RunInfo, dataset: Any) -> al.StartPoint:
    side = st.sidebar
    side.header("Starting point")
    mode = side.radio("Start from", ["Real study", "Prior sample"], key="mode", horizontal=True)
    if mode == "Real study":
        query = side.text_input("Search title", key="query")
        category = side.selectbox("Task category", ["any", *info.schema.categories], key="filter_category")
        split = side.selectbox("Split", ["any", "train", "val", "test"], key="filter_split")
        table = al.filter_studies(
            info.latents, query, None if category == "any" else category, None if split == "any" else split
        )
        if len(table):
            labels = {
                row.id: f"{row.title or '(untitled)'} · {row.year if row.year == row.year else '?'}"
                for row in table.itertuples()
            }
            study = side.selectbox(f"Study ({len(table)} shown)", list(labels), format_func=labels.get, key="study")
            return al.study_start(info, study, None if dataset is None else dataset[1])
        side.info("No study matches these filters; starting from a prior draw instead.")
    seed = side.number_input("Prior seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="seed")
    return al.prior_start(info, int(seed))


def latent_sliders(info: al.RunInfo, start: al.StartPoint, imputed: dict[str, float]) -> np.ndarray:
    side = st.sidebar
    side.header("Latents")
    n_max = info.latent_size
    n = side.slider("Sliders (most informative first, by KL)", 1, n_max, min(8, n_max), key="n_sliders")
    b1, b2 = side.columns(2)
    b1.button("Reset latents", on_click=apply_start, args=(info, start, imputed, True, False), key="reset_latents")
    b2.button(
        "Reset conditions", on_click=apply_start, args=(info, start, imputed, False, True), key="reset_conditions"
    )
    z = start.z.copy()
    for d in info.kl_order[:n]:
        key = f"z{d}"
        st.session_state.setdefault(key, float(start.z[d]))
        z[d] = side.slider(f"z{d} · KL {info.latent_kl[d]:.2f}", *al.LATENT_RANGE, step=0.05, key=key)
    return z


def condition_widgets(info: al.RunInfo, imputed: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """Task, year, sample size, field strength and FWHM widgets; returns the conditions and extrapolation notes."""
    st.subheader("Conditions")
    cols = st.columns(1 + len(CONTINUOUS_FIELDS))
    task = cols[0].selectbox("Task category", [UNKNOWN, *info.schema.categories], key="task")
    conditions: dict[str, Any] = {"task": None if task == UNKNOWN else task}
    notes = []
    for col, name in zip(cols[1:], CONTINUOUS_FIELDS, strict=True):
        lo, hi, step = al.slider_spec(info.schema, name)
        unknown = col.checkbox("unknown", key=f"{name}_unknown", help="let the model impute this field")
        value = col.slider(al.FIELD_LABELS[name], lo, hi, step=step, key=f"{name}_value", disabled=unknown)
        conditions[name] = None if unknown else float(value)
        if unknown:
            if name in imputed:
                col.caption(f"imputed from the study's map ≈ {imputed[name]:.3g}")
            else:
                col.caption(f"imputed by the model (default ≈ {info.imputed_defaults[name]:.3g})")
        note = al.extrapolation_note(info.schema, name, conditions[name])
        if note:
            col.warning(note, icon="⚠️")
            notes.append(f"{name}: {note}")
        elif not unknown:
            spec = info.schema.field(name)
            col.caption(f"training range [{spec.low:g}, {spec.high:g}]")
    return conditions, notes


def view_controls(renderer: al.SliceRenderer) -> tuple[tuple[float, float, float], float]:
    bounds = renderer.bounds_mm()
    cols = st.columns(5)
    cut = []
    for col, axis, (lo, hi), default in zip(cols[:3], "xyz", bounds, DEFAULT_CUT, strict=True):
        st.session_state.setdefault(f"cut_{axis}", float(np.clip(default, lo, hi)))
        cut.append(col.slider(f"{axis} cut (mm)", float(lo), float(hi), step=1.0, key=f"cut_{axis}"))
    threshold = cols[3].slider("Overlay threshold (fraction of the range)", 0.0, 0.95, 0.2, step=0.05, key="threshold")
    peak = st.session_state.get("_peak")
    cols[4].button("Cut at peak", on_click=set_cut, args=(peak,), disabled=peak is None, key="cut_peak")
    return (cut[0], cut[1], cut[2]), threshold


def main() -> None:
    st.set_page_config(page_title="Counterfactual Machine", layout="wide")
    st.title("Counterfactual Machine")
    run_dir, dataset_dir = al.resolve_paths(sys.argv[1:], os.environ, REPO_ROOT)
    key = str(run_dir)
    try:
        stamp = _stamp(run_dir)
        info = load_info(key, stamp)
        load_model(key, stamp)
        renderer = load_renderer(key, stamp)
        freeze_gc()
    except al.NoRunError as err:
        st.warning(str(err))
        return
    except SchemaError as err:
        st.error(f"The decoder in `{run_dir}` does not match this app: {err}")
        return
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        st.error(f"Could not load the run `{run_dir}`: {type(err).__name__}: {err}")
        return
    dataset_dir = dataset_dir or info.dataset_dir
    dataset = load_dataset(str(dataset_dir)) if dataset_dir else None
    st.caption(
        f"Run `{run_dir}` · model `{info.model_kind}` · {info.latent_size} latents · "
        f"{len(info.latents)} studies · dataset: {f'`{dataset_dir}`' if dataset is not None else 'not available'}"
    )

    overrides = read_query_params(info) if "_start_key" not in st.session_state else {}
    start = pick_start(info, dataset)
    imputed: dict[str, float] = {}
    if dataset is not None and not start.key.startswith("prior:"):
        imputed, note = study_imputed(key, stamp, str(dataset_dir), start.key)
        if note:
            st.sidebar.caption(note)
    if st.session_state.get("_start_key") != start.key:
        apply_start(info, start, imputed)
        st.session_state.update(overrides)
        st.session_state["_start_key"] = start.key
    z = latent_sliders(info, start, imputed)
    conditions, notes = condition_widgets(info, imputed)
    cut, threshold = view_controls(renderer)

    allow = bool(notes)
    query = make_query(z, conditions, allow, imputed)
    t0 = time.perf_counter()
    try:
        result = decode_cached(key, stamp, query)
        reference = decode_cached(key, stamp, make_query(start.z, start.conditions, True, imputed)).map
    except SchemaError as err:
        st.error(f"These conditions are not valid for this decoder: {err}")
        return
    decode_ms = (time.perf_counter() - t0) * 1000
    current = result.map
    st.session_state["_peak"] = renderer.peak_mm(current)

    t0 = time.perf_counter()
    low, top = al.value_range([current], info.mask)
    level = low + threshold * (top - low)
    st.subheader("Generated map")
    left, right = st.columns(2)
    left.image(renderer.ortho(current, cut, vmin=low, vmax=top, threshold=level), caption=f"Generated · {start.label}")
    real = None
    if dataset is not None:
        maps, meta = dataset
        rows = np.flatnonzero(meta["id"].to_numpy() == start.key)
        if rows.size and tuple(maps.shape[1:]) == info.mask.shape:
            real = np.asarray(maps[int(rows[0])], dtype=np.float32)
            real = real / max(float(real.max()), 1e-12)
    if real is not None:
        right.image(
            renderer.ortho(real, cut, vmax=1.0, threshold=threshold),
            caption="Real map of the study (MA, scaled to its peak)",
        )
    elif start.key.startswith("prior:"):
        right.info("A prior draw has no real map.")
    else:
        right.info("Real map not shown: pass `--dataset_dir DATA` (or `CBVAE_DATASET_DIR`) to see the study's own map.")

    st.subheader("Counterfactual difference")
    diff = current - reference
    span = max(float(np.abs(diff[info.mask]).max()) if info.mask.any() else 0.0, 1e-6)
    st.image(
        renderer.ortho(diff, cut, cmap="RdBu_r", vmin=-span, vmax=span, threshold=threshold * span),
        caption="current − starting point (red: more activation than at the start)"
        + (" · identical to the starting point" if span <= 1e-6 else ""),
    )
    render_ms = (time.perf_counter() - t0) * 1000

    st.subheader("Year sweep")
    years = al.sweep_years(info.schema)
    t0 = time.perf_counter()
    sweep = sweep_cached(key, stamp, query, tuple(years))
    sweep_decode_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    lo, hi = al.value_range(sweep, info.mask)
    tiles = [renderer.axial(m, cut[2], vmin=lo, vmax=hi, threshold=lo + threshold * (hi - lo)) for m in sweep]
    st.image(tiles, caption=[f"{y}" for y in years], width=140)
    st.caption(
        f"Current latents and task, year varied over the training range; axial cut z={cut[2]:.0f} mm, shared colour scale."
    )
    render_ms += (time.perf_counter() - t0) * 1000

    st.download_button(
        "Download the current map (NIfTI)",
        data=lambda: al.nifti_bytes(result.to_nifti()),
        file_name="counterfactual.nii.gz",
        mime="application/gzip",
        key="download",
    )
    st.caption(
        f"decode {decode_ms:.0f} ms · year sweep decode {sweep_decode_ms:.0f} ms · render {render_ms:.0f} ms"
        + (" · extrapolating" if allow else "")
    )
    if st.toggle("Interactive viewer (nilearn view_img, ~0.5 s per map)", key="viewer"):
        html = viewer_html(key, stamp, query, level, top, cut)
        # st.iframe replaces components.v1.html in recent Streamlit; both embed brainsprite's inline scripts
        if hasattr(st, "iframe"):
            st.iframe(html, height=460)
        else:
            components.html(html, height=460)


def run() -> None:
    """Entry point: every error becomes a one-line message on the page, never a traceback."""
    try:
        main()
    except Exception as err:  # noqa: BLE001 - the page must stay usable; the traceback goes to the log
        logger.exception("app error")
        st.error(f"error: {type(err).__name__}: {err}")


run()
