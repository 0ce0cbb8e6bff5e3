"""The Counterfactual Machine: hold a study fixed, change its conditions (in words or with sliders) and see
what the decoder generates, what changed, and the real studies the prediction stands on.

Run with ``streamlit run app/streamlit_app.py --server.address 127.0.0.1 [-- --run_dir RUN --dataset_dir DATA]``
(or the environment variables ``CBVAE_RUN_DIR`` / ``CBVAE_DATASET_DIR``); the page refuses to serve on any
other than a loopback address unless ``CBVAE_APP_ALLOW_REMOTE=1``; the default run is ``runs/cbvae`` as written by
``scripts/run_main.sh``. A run folder is code (``decoder.ts`` is TorchScript): open only runs you trust.
See ``bundle/docs/app.md``.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `streamlit run` without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from cbvae_ext.extras import MissingExtraError, require  # noqa: E402

try:  # the app extra: pip install "cbvae[app]" (light: a missing one is said at once, before MONAI's ~10 s import)
    st = require("streamlit", needed_by="the Counterfactual Machine page", light=True)
    components = require("streamlit.components.v1", needed_by="the Counterfactual Machine page", light=True)
except MissingExtraError as err:
    raise SystemExit(f"error: {err}") from None

from cbvae_ext import __version__  # noqa: E402
from cbvae_ext.app import downloads as dl  # noqa: E402
from cbvae_ext.app import evidence as ev  # noqa: E402
from cbvae_ext.app import keys  # noqa: E402
from cbvae_ext.app import session as al  # noqa: E402
from cbvae_ext.app import state as us  # noqa: E402
from cbvae_ext.app import upload as up  # noqa: E402
from cbvae_ext.app.markup import md_escape  # noqa: E402
from cbvae_ext.app.render import GENERATED_LABEL, SliceRenderer  # noqa: E402
from cbvae_ext.app.serving import remote_refusal  # noqa: E402
from cbvae_ext.app.terms import QueryTokeniser  # noqa: E402
from cbvae_ext.app.uncertainty import N_SAMPLES, prior_spread  # noqa: E402
from cbvae_ext.app.words import MAX_WORDS, TopicMatch, TopicVocabulary  # noqa: E402
from cbvae_ext.errors import CbvaeError  # noqa: E402
from cbvae_ext.schema import CONTINUOUS_FIELDS, SchemaError  # noqa: E402

__all__: list[str] = []

logger = logging.getLogger("cbvae_ext.app.page")
DEFAULT_CUT = (0.0, -18.0, 18.0)
UNKNOWN = "unknown (model imputes)"
N_TOPIC_SLIDERS = 5


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
def load_renderer(run_dir: str, stamp: float) -> SliceRenderer:
    info = load_info(run_dir, stamp)
    return SliceRenderer(info.affine, info.mask.shape, info.mask)


@st.cache_resource(show_spinner="Reading the Harvard-Oxford and Seitzman atlases…", max_entries=4)
def load_regions(run_dir: str, stamp: float) -> Any:
    from cbvae_ext.app.regions import RegionLabeller

    info = load_info(run_dir, stamp)
    try:
        return RegionLabeller(info.affine, info.mask.shape, info.mask)
    except (OSError, ValueError) as err:  # no atlas: the "what changed" line says so
        return str(err)


@st.cache_resource(max_entries=4)
def load_vocabulary(run_dir: str, stamp: float) -> TopicVocabulary | None:
    schema = load_info(run_dir, stamp).schema
    return TopicVocabulary(schema.topic_keys, schema.topic_names) if schema.n_topics else None


@st.cache_resource(show_spinner="Reading NeuroQuery's vocabulary…", max_entries=2)
def load_tokeniser(directory: str) -> QueryTokeniser | str:
    """NeuroQuery's tokeniser over the folder's vocabulary, or a one-line message why not."""
    try:
        return QueryTokeniser.from_directory(directory)
    except (OSError, ValueError) as err:
        return al.one_line(err)


def find_tokeniser() -> QueryTokeniser | str:
    """The tokeniser of ``CBVAE_NEUROQUERY_DIR``, else of ``../shared/data/neuroquery`` (never downloads)."""
    from cbvae_ext.data.neuroquery import resolve_neuroquery_dir

    try:
        return load_tokeniser(str(resolve_neuroquery_dir(fetch=False)))
    except CbvaeError as err:
        return al.one_line(err)


@st.cache_resource(show_spinner="Opening the dataset…", max_entries=2)
def load_dataset(dataset_dir: str) -> Any:
    """``(maps, metadata)`` or None when absent; a damaged dataset is a one-line message (a ``str``)."""
    try:
        return al.load_dataset_rows(Path(dataset_dir))
    except al.DatasetUnreadable as err:
        return str(err)


@st.cache_resource(max_entries=4)
def dataset_vectors(run_dir: str, stamp: float, dataset_dir: str, name: str = "topics") -> np.ndarray | None:
    """``[N, size]`` topic weights (or, ``name="terms"``, text embeddings) of the run's studies (rows of
    ``latents.parquet``; NaN: unknown)."""
    info, data = load_info(run_dir, stamp), load_dataset(dataset_dir)
    if not isinstance(data, tuple):
        return None
    return al.study_vectors(info, data[1], name)


@st.cache_resource(show_spinner="Opening the run for your study (first time: scoring the test studies)…", max_entries=2)
def load_study_context(run_dir: str, stamp: float, dataset_dir: str | None) -> Any:
    """The study package's ``StudyContext`` of the run (once per run: the test studies' typicality scores are
    computed or read from the cache here), or a one-line message why not."""
    from cbvae_ext.study import StudyContext

    try:
        return StudyContext.open(run_dir, dataset_dir)
    except (CbvaeError, OSError, ValueError) as err:
        return al.one_line(err, 300)


@st.cache_resource(max_entries=8)
def analyse_cached(
    run_dir: str, stamp: float, dataset_dir: str | None, digest: str, _data: bytes, filename: str, metadata: tuple
) -> Any:
    """``cbvae_ext.study``'s analysis of an upload (``digest`` stands for its bytes), or its one-line error."""
    context = load_study_context(run_dir, stamp, dataset_dir)
    if isinstance(context, str):
        return context
    return up.analyse_upload(context, _data, filename, dict(metadata))


#: The conditions that say what a study is about: "unknown" for all of them is the condition contrast's base.
CONTENT = ("task", "topics", "terms")


@dataclass(frozen=True)
class Query:
    """What a map is decoded from; ``key`` (a digest) is what the caches hash, not the arrays."""

    z: tuple[float, ...]
    conditions: tuple
    allow: bool
    imputed: tuple
    key: str

    def conditions_dict(self, **changes: Any) -> dict[str, Any]:
        conditions = {k: np.asarray(v) if isinstance(v, tuple) else v for k, v in self.conditions}
        return {**conditions, **changes}


def make_query(z: np.ndarray, conditions: dict[str, Any], allow: bool, imputed: dict[str, float]) -> Query:
    items = tuple(
        sorted((k, tuple(np.round(v, 6).tolist()) if isinstance(v, np.ndarray) else v) for k, v in conditions.items())
    )
    zt, imp = tuple(np.round(np.asarray(z, np.float64), 6).tolist()), tuple(sorted(imputed.items()))
    key = hashlib.sha1(repr((zt, items, bool(allow), imp)).encode()).hexdigest()
    return Query(zt, items, bool(allow), imp, key)


# arguments named with a leading underscore are not hashed by Streamlit: the query's digest stands for them
@st.cache_resource(max_entries=32)
def decode_cached(run_dir: str, stamp: float, qkey: str, _q: Query, strength: float = 1.0) -> np.ndarray:
    """The map of one query; with task, topics or terms set, ``base + strength * (full - base)`` where ``base``
    decodes the same ``z`` and conditions with those unknown (the condition contrast)."""
    model = load_model(run_dir, stamp)
    conditions = _q.conditions_dict()
    if strength == 1.0 or all(conditions.get(k) is None for k in CONTENT):
        z = np.asarray(_q.z, np.float32)
        return model.decode(z, conditions, allow_extrapolation=_q.allow, imputed=dict(_q.imputed)).map
    full, base = decode_pair(run_dir, stamp, qkey, _q)
    return np.clip(base + strength * (full - base), 0.0, None).astype(np.float32)


@st.cache_resource(max_entries=16)
def decode_pair(run_dir: str, stamp: float, qkey: str, _q: Query) -> tuple[np.ndarray, np.ndarray]:
    """``decode(z, c)`` and ``decode(z, c with task, topics and terms unknown)`` in one batch."""
    model = load_model(run_dir, stamp)
    conds = [_q.conditions_dict(), _q.conditions_dict(**dict.fromkeys(CONTENT))]
    z = np.asarray(_q.z, np.float32)
    full, base = model.decode_many(z, conds, allow_extrapolation=_q.allow, imputed=dict(_q.imputed))
    return full.map, base.map


@st.cache_resource(max_entries=16)
def sweep_cached(
    run_dir: str, stamp: float, qkey: str, _q: Query, name: str, values: tuple[float, ...]
) -> list[np.ndarray]:
    """The query's maps over ``values`` of one continuous condition, decoded in one batch."""
    conds = [_q.conditions_dict(**{name: float(v)}) for v in values]
    model = load_model(run_dir, stamp)
    z = np.asarray(_q.z, np.float32)
    return [r.map for r in model.decode_many(z, conds, allow_extrapolation=True, imputed=dict(_q.imputed))]


@st.cache_resource(max_entries=16)
def contrast_cached(run_dir: str, stamp: float, qkey: str, _pair: tuple[Query, Query]) -> tuple[np.ndarray, np.ndarray]:
    """The maps of two queries that differ in their topics and terms only, decoded in one batch."""
    model = load_model(run_dir, stamp)
    first, second = _pair
    conds = [first.conditions_dict(), second.conditions_dict()]
    z = np.asarray(first.z, np.float32)
    maps = model.decode_many(z, conds, allow_extrapolation=first.allow, imputed=dict(first.imputed))
    return maps[0].map, maps[1].map


@st.cache_resource(max_entries=16)
def spread_cached(run_dir: str, stamp: float, qkey: str, _q: Query) -> np.ndarray:
    """Per-voxel standard deviation of ``N_SAMPLES`` maps decoded from prior draws under the query's conditions
    (``qkey`` is the digest of the conditions alone: moving a latent slider does not recompute it)."""
    return prior_spread(load_model(run_dir, stamp), _q.conditions_dict(), _q.allow, dict(_q.imputed))


@st.cache_resource(max_entries=16)
def conditional_mean_cached(run_dir: str, stamp: float, qkey: str, _q: Query) -> np.ndarray | None:
    """The model's estimate of the mean map of studies with these conditions (no latent code), or None
    for a model without it."""
    model = load_model(run_dir, stamp)
    if not model.has_conditional_mean:
        return None
    return model.conditional_mean(_q.conditions_dict(), allow_extrapolation=True).map


@st.cache_resource(max_entries=64)
def study_imputed(run_dir: str, stamp: float, dataset_dir: str, study_id: str) -> tuple[dict[str, float], str | None]:
    """The imputation head's values for a real study's missing fields (``encode`` of its real map), and a note
    when they cannot be computed (then the model's defaults are used)."""
    data = load_dataset(dataset_dir)
    if not isinstance(data, tuple):
        return {}, None
    maps, meta = data
    rows = np.flatnonzero(meta["id"].to_numpy() == study_id)
    if not rows.size:
        return {}, f"study {study_id} is not in the dataset {dataset_dir}"
    try:
        _, _, imputed = load_model(run_dir, stamp).encode(np.asarray(maps[int(rows[0])]), {}, return_imputed=True)
    except Exception as err:  # noqa: BLE001 - a damaged or hostile model.pt must not take the page down
        return {}, f"per-study imputation unavailable: {al.one_line(err)} (model.pt); the model's defaults are used"
    return imputed, None


@st.cache_resource(max_entries=16)
def real_map(dataset_dir: str, study_id: str) -> np.ndarray | None:
    """A study's real MA map scaled to its peak (the model's input scaling), or None."""
    from cbvae_ext.data import normalise_maps

    data = load_dataset(dataset_dir)
    if not isinstance(data, tuple):
        return None
    maps, meta = data
    rows = np.flatnonzero(meta["id"].to_numpy() == study_id)
    return normalise_maps(np.asarray(maps[int(rows[0])])[None])[0].numpy() if rows.size else None


@st.cache_resource(max_entries=16)
def mean_real_map(dataset_dir: str, ids: tuple[str, ...]) -> np.ndarray | None:
    """Mean of the studies' real maps, each scaled to its peak first."""
    from cbvae_ext.data import normalise_maps

    data = load_dataset(dataset_dir)
    if not isinstance(data, tuple) or not ids:
        return None
    maps, meta = data
    rows = np.flatnonzero(meta["id"].isin(ids).to_numpy())
    if not rows.size:
        return None
    return normalise_maps(np.asarray(maps[np.sort(rows)])).mean(dim=0).numpy()


@st.cache_resource(max_entries=8)
def viewer_html(
    run_dir: str, stamp: float, qkey: str, _q: Query, strength: float, threshold: float, vmax: float, cut: tuple
) -> str:
    """nilearn's brainsprite viewer of the map, standalone HTML (its scripts are inline: works offline)."""
    from nilearn.plotting import view_img

    img = dl.generated_nifti(decode_cached(run_dir, stamp, qkey, _q, strength), load_info(run_dir, stamp).affine)
    bg = load_renderer(run_dir, stamp).template_img  # already on the map grid: no 1 mm resampling
    doc = view_img(
        img, bg_img=bg, threshold=threshold, vmax=vmax, symmetric_cmap=False, cmap="hot",
        cut_coords=cut, black_bg=False, resampling_interpolation="nearest", title=GENERATED_LABEL,
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
            state[keys.latent(d)] = float(start.z[d])
    if conditions:
        state["task"] = start.conditions["task"] or UNKNOWN
        for name in CONTINUOUS_FIELDS:
            value = start.conditions[name]
            state[keys.field_unknown(name)] = value is None
            fallback = imputed.get(name, info.imputed_defaults[name])
            state[keys.field_value(name)] = al.slider_value(info.schema, name, fallback if value is None else value)
        set_topics(info, start.conditions.get("topics"))


def set_topics(info: al.RunInfo, weights: np.ndarray | None) -> None:
    """Topic widgets on a mixture (None: topics unknown): the heaviest topics get the sliders, the others a
    folded table; a new table key makes the table show the new weights."""
    state = st.session_state
    n = info.schema.n_topics
    w = np.zeros(n) if weights is None else np.round(np.asarray(weights, dtype=np.float64), 2)
    state["topics_known"] = weights is not None
    state["_topic_w"] = w.tolist()
    state["_topic_order"] = [int(t) for t in np.argsort(-w, kind="stable")]
    state["_topic_version"] = state.get("_topic_version", 0) + 1
    for t in state["_topic_order"][:N_TOPIC_SLIDERS]:
        state[keys.topic(t)] = float(w[t])


def url_overrides(info: al.RunInfo, url: us.UrlState) -> dict[str, Any]:
    """Widget values a shared link asks for (applied after the starting point)."""
    out: dict[str, Any] = {}
    if url.task is not None:
        out["task"] = UNKNOWN if url.task == "unknown" else url.task
    for name, value in url.values.items():
        out[keys.field_unknown(name)] = value is None
        if value is not None:
            out[keys.field_value(name)] = al.slider_value(info.schema, name, value)
    if url.z is not None:
        out.update({keys.latent(d): float(np.clip(v, *al.LATENT_RANGE)) for d, v in enumerate(url.z)})
    if url.strength is not None:
        out["strength"] = float(url.strength)
    if url.sweep is not None:
        out["sweep"] = url.sweep
    if url.query is not None:
        out["words"] = url.query
    if url.contrast is not None:
        out["contrast_a"], out["contrast_b"] = url.contrast
    if url.topics is not None:  # edited weights win over the words they came from
        weights = np.zeros(info.schema.n_topics)
        for t, w in url.topics.items():
            weights[t] = w
        out["_url_topics"] = weights if url.topics else None
        out["_words_applied"] = url.query if url.query is not None else ""
    return out


def read_url(info: al.RunInfo) -> tuple[dict[str, Any], us.UrlState]:
    """Initial state from the URL, once per session: starting point now, widget values after it."""
    params = {k: st.query_params[k] for k in st.query_params}
    fields = {name: al.slider_spec(info.schema, name)[:2] for name in CONTINUOUS_FIELDS}
    url, notes = us.parse_state(
        params,
        study_ids=set(info.latents["id"]),
        categories=info.schema.categories,
        fields=fields,
        latent_size=info.latent_size,
        n_topics=info.schema.n_topics,
    )
    if url.run is not None and url.run != info.run_dir.name:
        notes.append(f"this link was made on the run {url.run}; it is shown on {info.run_dir.name}")
    st.session_state["_url_notes"] = notes
    state = st.session_state
    if url.study is not None:
        state["study"] = url.study
    elif url.seed is not None or url.z is not None:
        state["mode"], state["seed"] = "Prior sample", int(url.seed or 0)
    return url_overrides(info, url), url


def set_cut(cut: tuple[float, float, float]) -> None:
    for axis, value in zip("xyz", cut, strict=True):
        st.session_state[keys.cut(axis)] = float(value)


# ----- page sections ------------------------------------------------------------------------------


def pick_start(
    info: al.RunInfo, dataset: Any, key: str, stamp: float, data_key: str | None
) -> tuple[al.StartPoint | None, Any]:
    """The starting point, and for an uploaded study its ``(analysis, result)`` or a one-line error (``str``)."""
    side = st.sidebar
    side.header("Starting point")
    mode = side.radio("Start from", ["Real study", "Prior sample", "Your study"], key="mode", horizontal=True)
    if mode == "Your study":
        return your_study_start(info, key, stamp, data_key)
    if mode == "Real study":
        query = side.text_input("Search title", key="query", max_chars=200)
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
            if st.session_state.get("study") not in labels:
                st.session_state.pop("study", None)
            study = side.selectbox(f"Study ({len(table)} shown)", list(labels), format_func=labels.get, key="study")
            return al.study_start(info, study, dataset[1] if isinstance(dataset, tuple) else None), None
        side.info("No study matches these filters; starting from a prior draw instead.")
    st.session_state.setdefault("seed", 0)
    seed = side.number_input("Prior seed", min_value=0, max_value=2**31 - 1, step=1, key="seed")
    return al.prior_start(info, int(seed)), None


def your_study_start(
    info: al.RunInfo, key: str, stamp: float, data_key: str | None
) -> tuple[al.StartPoint | None, Any]:
    """An uploaded file read by ``cbvae_ext.study``: its (chosen) study as the starting point, or why not."""
    side = st.sidebar
    file = side.file_uploader(
        "Study file: Sleuth/GingerALE .txt, CSV/TSV of x, y, z, space; NiMARE dataset .json; NIfTI map",
        type=list(up.UPLOAD_TYPES), key="upload",
        help="Read and analysed with cbvae_ext.study (bundle/docs/study.md): the same reader, kernel and grid as "
        "the dataset builder.",
    )  # fmt: skip
    text = side.text_area("Text (title or abstract, optional)", key="upload_text", max_chars=us.MAX_QUERY_CHARS)
    c1, c2 = side.columns(2)
    year = c1.number_input("Year (optional)", min_value=1900, max_value=2100, value=None, step=1, key="upload_year")
    n = c2.number_input("Sample size (optional)", min_value=1, max_value=100000, value=None, step=1, key="upload_n")
    task = side.selectbox("Task (optional)", ["(as the file says)", *info.schema.categories], key="upload_task")
    if file is None:
        return None, None
    data = file.getvalue()
    metadata = up.upload_metadata(text, year, n, None if task.startswith("(") else task)
    digest = hashlib.sha1(data + repr(sorted(metadata.items())).encode()).hexdigest()[:16]
    analysis = analyse_cached(key, stamp, data_key, digest, data, file.name, tuple(sorted(metadata.items())))
    if isinstance(analysis, str):
        return None, analysis
    names = [r.study.name for r in analysis.results]
    index = 0
    if len(names) > 1:
        index = side.selectbox(
            f"Study in the file ({len(names)})", range(len(names)), format_func=lambda i: names[i], key="upload_study"
        )  # fmt: skip
    result = analysis.results[int(index)]
    return up.upload_start(info, result, f"upload:{digest}:{index}", file.name), (analysis, result)


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
    z = np.array([st.session_state.get(keys.latent(d), start.z[d]) for d in range(n_max)], dtype=np.float32)
    for d in info.kl_order[:n]:
        key = keys.latent(d)
        st.session_state.setdefault(key, float(start.z[d]))
        z[d] = side.slider(f"z{d} · KL {info.latent_kl[d]:.2f}", *al.LATENT_RANGE, step=0.05, key=key)
    return z


def _listing(items: list[str], n: int = 12) -> str:
    """Escaped items joined by commas, the first ``n`` of them."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(md_escape(i) for i in items[:n]) + more


def match_words(vocab: TopicVocabulary, tokeniser: QueryTokeniser | str, text: str) -> TopicMatch:
    """NeuroQuery's terms of ``text`` to topics when its vocabulary is available, else the topics' key words."""
    return vocab.match(text) if isinstance(tokeniser, str) else vocab.match_terms(tokeniser(text))


def text_terms(info: al.RunInfo, tokeniser: QueryTokeniser | str, text: str) -> np.ndarray | None:
    """The ``terms`` condition of a text (NeuroQuery's terms, embedded as a study's text was); None for a run
    without terms, without NeuroQuery's vocabulary, or when no term was recognised."""
    if info.embedder is None or isinstance(tokeniser, str) or not text.strip():
        return None
    found = info.embedder.embed_terms([t.term for t in tokeniser(text).terms])
    return None if found is None else found.astype(np.float32)


def read_words(
    vocab: TopicVocabulary, tokeniser: QueryTokeniser | str, text: str, with_terms: bool = False
) -> TopicMatch:
    """The words matched, and shown as read: recognised, recognised without a topic, ignored (``with_terms``:
    the run is also conditioned on the terms themselves)."""
    if isinstance(tokeniser, str):
        st.caption(f"NeuroQuery's vocabulary is not available ({md_escape(tokeniser)}): words are matched to the "
                   "topics' key words only.")  # fmt: skip
    match = match_words(vocab, tokeniser, text)
    if not text.strip():
        st.caption("Type terms to set the topic mixture from words, or move the topic sliders.")
    elif match.empty and not match.no_topic:
        st.warning("Nothing in these words was recognised; the topics are unchanged.", icon="⚠️")
    if match.matched:
        found = [f"{term} → {len(ts)} topic{'s' * (len(ts) != 1)}" for term, ts in match.matched]
        st.caption(f"Recognised: {_listing(found, 24)}")
    if match.no_topic and with_terms:
        st.caption(f"Recognised, no topic lists it (it counts through the terms condition): {_listing(match.no_topic)}")
    elif match.no_topic:
        st.warning(
            f"Recognised, but no topic lists it: {_listing(match.no_topic)}. This run is conditioned on topics, "
            "not on terms, so these words do not change the map.", icon="⚠️",
        )  # fmt: skip
    if match.ignored:
        st.caption(f"Ignored: {_listing([f'{w} ({why})' for w, why in match.ignored])}")
    if match.truncated:
        st.caption(f"Only the first {MAX_WORDS} words were read ({match.truncated} more ignored).")
    return match


def ask_in_words(info: al.RunInfo, vocab: Any, tokeniser: QueryTokeniser | str) -> tuple[np.ndarray | None, str]:
    """The text box, what it was read as and the (folded) topic sliders; returns the topic condition and the text."""
    st.subheader("Ask in words")
    if vocab is None:
        st.info("This run was trained without topic conditioning (no Neurosynth topics in its schema).")
        return None, ""
    state = st.session_state
    text = st.text_input(
        "Terms (e.g. working memory, pain, theory of mind)", key="words", max_chars=us.MAX_QUERY_CHARS,
        help="Read with NeuroQuery's 7,547-term vocabulary and synonyms, then matched to the key words of "
        "Neurosynth's 50 LDA topics; see bundle/docs/app.md.",
    )  # fmt: skip
    match = read_words(vocab, tokeniser, text, info.embedder is not None)
    if text != state.get("_words_applied"):
        state["_words_applied"] = text
        if not match.empty:
            set_topics(info, match.weights)
    known = st.checkbox("Condition on topics", key="topics_known", help="unticked: topics unknown (the model imputes)")
    n = info.schema.n_topics
    weights = np.asarray(state.get("_topic_w") or np.zeros(n), dtype=np.float64).copy()
    order = state.get("_topic_order") or list(range(n))
    with st.expander(f"Topic weights ({n} topics, set by the words above)"):
        for col, t in zip(st.columns(N_TOPIC_SLIDERS), order[:N_TOPIC_SLIDERS], strict=False):
            state.setdefault(keys.topic(t), float(weights[t]))
            label = f"{t}: {vocab.label(t, 3)}"
            weights[t] = col.slider(label, 0.0, 1.0, step=0.01, key=keys.topic(t), disabled=not known)
        rest = order[N_TOPIC_SLIDERS:]
        # one table instead of 45 sliders: every widget costs milliseconds on each rerun
        st.caption(f"Other topics ({len(rest)})")
        base = pd.DataFrame({"topic": rest, "key words": [vocab.label(t, 6) for t in rest], "weight": weights[rest]})
        table = st.data_editor(
            base, key=keys.topic_table(state.get("_topic_version", 0)), hide_index=True,
            disabled=["topic", "key words"],
            column_config={"weight": st.column_config.NumberColumn(min_value=0.0, max_value=1.0, step=0.01)},
        )  # fmt: skip
        if not known:
            st.caption("Tick *Condition on topics* for these weights to count.")
    edited = pd.to_numeric(table["weight"], errors="coerce").fillna(0.0).clip(0.0, 1.0).to_numpy()
    weights[rest] = edited
    state["_topic_w"] = weights.tolist()
    if not known:
        return None, text
    if weights.sum() <= 0:
        st.warning("All topic weights are 0: topics are treated as unknown.", icon="⚠️")
        return None, text
    heaviest = np.argsort(-weights, kind="stable")[:3]
    mixture = [f"{t} ({', '.join(vocab.keys[t][:3])}) {weights[t] / weights.sum():.2f}" for t in heaviest if weights[t]]
    st.caption(f"Topic mixture: {_listing(mixture)}")
    return weights, text


def condition_widgets(info: al.RunInfo, imputed: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """Task, year, sample size, field strength and FWHM widgets; returns the conditions and extrapolation notes."""
    st.subheader("Conditions")
    cols = st.columns(1 + len(CONTINUOUS_FIELDS))
    task = cols[0].selectbox("Task category", [UNKNOWN, *info.schema.categories], key="task")
    conditions: dict[str, Any] = {"task": None if task == UNKNOWN else task}
    notes = []
    for col, name in zip(cols[1:], CONTINUOUS_FIELDS, strict=True):
        lo, hi, step = al.slider_spec(info.schema, name)
        unknown = col.checkbox("unknown", key=keys.field_unknown(name), help="let the model impute this field")
        value = col.slider(al.field_label(name), lo, hi, step=step, key=keys.field_value(name), disabled=unknown)
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


def view_controls(renderer: SliceRenderer) -> tuple[tuple[float, float, float], float]:
    bounds = renderer.bounds_mm()
    cols = st.columns(5)
    cut = []
    for col, axis, (lo, hi), default in zip(cols[:3], "xyz", bounds, DEFAULT_CUT, strict=True):
        st.session_state.setdefault(keys.cut(axis), float(np.clip(default, lo, hi)))
        cut.append(col.slider(f"{axis} cut (mm)", float(lo), float(hi), step=1.0, key=keys.cut(axis)))
    threshold = cols[3].slider("Overlay threshold (fraction of the range)", 0.0, 0.95, 0.2, step=0.05, key="threshold")
    peak = st.session_state.get("_peak")
    cols[4].button("Cut at peak", on_click=set_cut, args=(peak,), disabled=peak is None, key="cut_peak")
    return (cut[0], cut[1], cut[2]), threshold


def difference_panels(
    info: al.RunInfo, renderer: SliceRenderer, regions: Any, diff: np.ndarray, peak_of: np.ndarray, cut: tuple,
    threshold: float, stretch: bool, reference: str,
) -> None:  # fmt: skip
    """Slices and glass brain of a difference, its largest change against ``peak_of``'s peak, and what changed."""
    peak = max(float(peak_of[info.mask].max()) if info.mask.any() else 0.0, 1e-6)
    largest = float(np.abs(diff[info.mask]).max()) if info.mask.any() else 0.0
    span = max(largest, 1e-9) if stretch else peak
    left, right = st.columns([3, 2])
    left.image(
        renderer.ortho(
            diff, cut, cmap="RdBu_r", vmin=-span, vmax=span, threshold=threshold * span, title=GENERATED_LABEL
        ),
        caption=f"Generated difference (red: more than {reference}) · colour scale "
        + ("stretched to the difference" if stretch else "± the generated map's peak"),
    )
    right.image(
        renderer.glass_brain(diff, cmap="RdBu_r", vmin=-span, vmax=span, threshold=threshold * span),
        caption="Glass brain of the difference (largest change along each axis)",
    )
    st.markdown(
        f"**Largest change: {largest:.2g}** = {100 * largest / peak:.1f} % of the generated map's peak ({peak:.2g})"
        + (f" · identical to {reference}" if largest <= 1e-6 else "")
    )
    if isinstance(regions, str):
        st.caption(f"What changed: no atlas ({md_escape(regions)})")
    elif largest > 1e-6:
        gained, lost = regions.summary(diff, n=3, floor=0.05 * largest)
        fmt = lambda cs: ", ".join(f"{c.name} ({c.mean_change:+.2g})" for c in cs) or "none"  # noqa: E731
        st.caption(
            f"What changed (Harvard-Oxford cortical regions; hippocampus, amygdala, basal ganglia, thalamus and "
            f"cerebellum from Seitzman et al. 2018's ROI spheres; mean change): gained {fmt(gained)}; lost {fmt(lost)}"
        )


def difference_view(
    info: al.RunInfo, renderer: SliceRenderer, regions: Any, current: np.ndarray, others: dict[str, np.ndarray],
    cut: tuple, threshold: float,
) -> None:  # fmt: skip
    """The difference to a reference, scaled against the map's own range unless asked otherwise."""
    st.subheader("Counterfactual difference")
    c1, c2 = st.columns([3, 2])
    against = c1.radio("Compare the generated map with", list(others), key="compare", horizontal=True)
    stretch = c2.checkbox("Stretch colours to the difference's own extremes", key="stretch")
    difference_panels(
        info, renderer, regions, current - others[against], current, cut, threshold, stretch, "the reference"
    )


def contrast_view(
    info: al.RunInfo, renderer: SliceRenderer, regions: Any, vocab: TopicVocabulary, tokeniser: QueryTokeniser | str,
    query: Query, cut: tuple, threshold: float, key: str, stamp: float,
) -> None:  # fmt: skip
    """A contrast of two queries: the map of query A minus that of query B, at the same latents and conditions."""
    st.subheader("Contrast of two queries")
    c1, c2 = st.columns(2)
    texts = (
        c1.text_input("Query A", key="contrast_a", max_chars=us.MAX_QUERY_CHARS, placeholder="pain"),
        c2.text_input("minus query B", key="contrast_b", max_chars=us.MAX_QUERY_CHARS, placeholder="touch"),
    )
    if not all(t.strip() for t in texts):
        st.caption("Type two queries (e.g. pain minus touch): the map generated with A's topics minus B's, at the "
                   "current latents and other conditions.")  # fmt: skip
        return
    matches = [match_words(vocab, tokeniser, t) for t in texts]
    terms = [text_terms(info, tokeniser, t) for t in texts]
    for col, name, match in zip((c1, c2), "AB", matches, strict=True):
        said = _listing([term for term, _ in match.matched]) or "nothing"
        col.caption(
            f"{name} recognised: {said}" + (f"; no topic: {_listing(match.no_topic)}" if match.no_topic else "")
        )
    if any(m.empty and t is None for m, t in zip(matches, terms, strict=True)):
        st.warning("A query recognised nothing that a topic lists: no contrast to show.", icon="⚠️")
        return
    changes = [{"topics": None if m.empty else m.weights} for m in matches]
    if info.schema.term_dims:
        changes = [{**c, "terms": t} for c, t in zip(changes, terms, strict=True)]
    pair = tuple(make_query(np.asarray(query.z), query.conditions_dict(**c), query.allow, dict(query.imputed))
                 for c in changes)  # fmt: skip
    first, second = contrast_cached(key, stamp, pair[0].key + pair[1].key, pair)
    stretch = st.checkbox("Stretch colours to the contrast's own extremes", key="contrast_stretch")
    difference_panels(info, renderer, regions, first - second, first, cut, threshold, stretch, "query B")


def evidence_view(
    info: al.RunInfo, renderer: SliceRenderer, dataset_dir: str | None, topics: np.ndarray | None,
    query: Query, current: np.ndarray, cut: tuple, threshold: float, key: str, stamp: float,
) -> None:  # fmt: skip
    """The real studies the conditions stand on and their mean map beside the generated one."""
    st.subheader("Evidence: real studies for these conditions")
    if dataset_dir is None:
        st.info("Pass `--dataset_dir DATA` (or `CBVAE_DATASET_DIR`) to see the real studies behind a prediction.")
        return
    study_topics = dataset_vectors(key, stamp, dataset_dir)
    found = ev.find_evidence(info.latents, study_topics, topics, query.conditions_dict().get("task"))
    if found is None:
        st.info("Set a task category or topics to see the real studies that match them.")
        return
    st.caption(f"Chosen by: {md_escape(found.rule)}.")
    cols = st.columns(2)
    listed = []
    for col, name, table in (
        (cols[0], "Held-out studies", found.held_out),
        (cols[1], "Training studies", found.training),
    ):
        col.markdown(f"**{name}** ({len(table)})")
        if len(table):
            col.dataframe(table, hide_index=True, width="stretch")
            listed += table["id"].tolist()
    if not listed:
        st.info("No study of the dataset matches these conditions.")
        return
    titles = info.latents.set_index("id")["title"].to_dict()
    pick = st.selectbox(
        "Show the real map of", ["(none)", *listed], key="evidence_study",
        format_func=lambda i: i if i == "(none)" else f"{str(titles.get(i) or '(untitled)')[:90]} ({i})",
    )  # fmt: skip
    if pick != "(none)":
        chosen = real_map(dataset_dir, pick)
        if chosen is not None:
            st.image(renderer.ortho(chosen, cut, vmax=1.0, threshold=threshold), caption=f"Real map of {pick} (data)")
    mean = mean_real_map(dataset_dir, tuple(found.matching))
    if mean is None:
        return
    r = ev.map_correlation(current, mean, info.mask)
    cond_mean = conditional_mean_cached(key, stamp, query.key, query)
    cols = st.columns(3 if cond_mean is not None else 2)
    low, top = al.value_range([current], info.mask)
    cols[0].image(
        renderer.ortho(
            current, cut, vmin=low, vmax=top, threshold=low + threshold * (top - low), title=GENERATED_LABEL
        ),
        caption=f"Generated map · r = {r:.2f} with the real mean",
    )
    if cond_mean is not None:
        lo_c, hi_c = al.value_range([cond_mean], info.mask)
        r_c = ev.map_correlation(cond_mean, mean, info.mask)
        cols[1].image(
            renderer.ortho(cond_mean, cut, vmin=lo_c, vmax=hi_c, threshold=lo_c + threshold * (hi_c - lo_c),
                           title=GENERATED_LABEL),
            caption=f"Model's conditional mean (conditions alone, no z) · r = {r_c:.2f} with the real mean",
        )  # fmt: skip
    cols[-1].image(
        renderer.ortho(mean, cut, vmax=float(mean.max()) or 1.0, threshold=threshold * float(mean.max())),
        caption=f"Mean real map of the {len(found.matching)} matching studies (data)",
    )
    st.markdown(f"**Correlation of the generated map with the mean real map: r = {r:.2f}** (inside the brain mask)")


def sweep_view(
    info: al.RunInfo, renderer: SliceRenderer, query: Query, z: np.ndarray, conditions: dict[str, Any],
    start: al.StartPoint, cut: tuple, threshold: float, key: str, stamp: float,
) -> float:  # fmt: skip
    """Maps over one continuous condition, with a 4D NIfTI + JSON download; returns the decode time (ms)."""
    st.subheader("Sweep")
    name = st.selectbox("Sweep over", list(CONTINUOUS_FIELDS), format_func=al.field_label, key="sweep")
    values = al.sweep_values(info.schema, name)
    t0 = time.perf_counter()
    maps = sweep_cached(key, stamp, query.key, query, name, tuple(values))
    decode_ms = (time.perf_counter() - t0) * 1000
    lo, hi = al.value_range(maps, info.mask)
    tiles = [renderer.axial(m, cut[2], vmin=lo, vmax=hi, threshold=lo + threshold * (hi - lo)) for m in maps]
    st.image(tiles, caption=[f"{v:g}" for v in values], width=150)
    st.caption(
        f"Generated maps: current latents and conditions, {al.field_label(name).lower()} varied; axial cut "
        f"z={cut[2]:.0f} mm, shared colour scale."
    )
    common = {"run_dir": str(info.run_dir), "export_id": info.export_id, "field": name, "values": values}
    c1, c2 = st.columns(2)
    c1.download_button(
        f"Download the sweep (4D NIfTI, {len(values)} volumes)",
        data=lambda: dl.nifti_bytes(dl.generated_nifti(np.stack(maps), info.affine, intent=f"sweep {name}")),
        file_name=f"generated_sweep_{name}.nii.gz", mime="application/gzip", key="download_sweep",
    )  # fmt: skip
    c2.download_button(
        "Download its JSON sidecar",
        data=lambda: dl.sweep_sidecar(
            **common, conditions=conditions, z=z, start=start.key, version=__version__
        ),
        file_name=f"generated_sweep_{name}.json", mime="application/json", key="download_sidecar",
    )  # fmt: skip
    return decode_ms


def your_study_view(
    info: al.RunInfo, renderer: SliceRenderer, analysis: Any, result: Any, cut: tuple, threshold: float
) -> None:
    """The uploaded study: typicality and warnings, its MA map and reconstruction, the nearest dataset studies and
    the study package's files (NIfTI + JSON sidecars, generated maps labelled) as one download."""
    st.subheader("Your study")
    st.markdown(md_escape(up.typicality_sentence(result)))
    for warning in result.warnings:
        st.warning(md_escape(warning), icon="⚠️")
    c1, c2 = st.columns(2)
    ma = result.ma_map
    top = float(ma.max()) or 1.0
    c1.image(
        renderer.ortho(ma, cut, vmax=top, threshold=threshold * top),
        caption="Your study's MA map (data: its peaks with the run's kernel on the run's grid)",
    )
    if result.reconstruction is not None:
        low, high = al.value_range([result.reconstruction], info.mask)
        c2.image(
            renderer.ortho(result.reconstruction, cut, vmin=low, vmax=high, threshold=low + threshold * (high - low),
                           title=GENERATED_LABEL),
            caption="Reconstruction (generated: decode of its posterior mean under its conditions); the latents "
            "above start at that posterior",
        )  # fmt: skip
    near = up.nearest_table(result)
    if len(near):
        st.markdown("**Nearest dataset studies** (Pearson r of the MA maps inside the brain mask)")
        st.dataframe(near, hide_index=True, width="stretch")
    notes = [*analysis.context.notes, *result.notes]
    if notes:
        st.caption("Notes: " + "; ".join(md_escape(n) for n in notes))
    st.download_button(
        "Download your study's maps and report (.zip: NIfTI + JSON sidecars, generated maps labelled)",
        data=analysis.zip_bytes, file_name="your_study.zip", mime="application/zip", key="download_study",
    )  # fmt: skip


def uncertainty_view(
    info: al.RunInfo, renderer: SliceRenderer, spread: np.ndarray, cut: tuple, threshold: float
) -> None:
    """Per-voxel standard deviation of maps sampled for the current conditions, beside the generated map."""
    top = max(float(spread[info.mask].max()) if info.mask.any() else 0.0, 1e-6)
    left, right = st.columns([3, 2])
    left.image(
        renderer.ortho(spread, cut, cmap="viridis", vmax=top, threshold=threshold * top, title=GENERATED_LABEL),
        caption=f"Uncertainty (generated): per-voxel standard deviation of {N_SAMPLES} maps decoded from prior draws "
        "z ~ N(0, I) under the current conditions; bright where studies with these conditions differ most",
    )
    right.markdown(
        f"**Spread of sampled maps: up to {top:.2g}** (standard deviation; the generated map's own scale is above). "
        "It depends on the conditions only, not on the latent sliders."
    )


def main() -> None:
    t_start = time.perf_counter()
    st.set_page_config(page_title="Counterfactual Machine", layout="wide")
    st.title("Counterfactual Machine")
    refusal = remote_refusal(st.get_option("server.address"), os.environ)
    if refusal:
        st.error(refusal)
        st.stop()
    run_dir, dataset_dir = al.resolve_paths(sys.argv[1:], os.environ, REPO_ROOT)
    key = str(run_dir)
    try:
        stamp = _stamp(run_dir)
        info = load_info(key, stamp)
        load_model(key, stamp)
        renderer = load_renderer(key, stamp)
        freeze_gc()
    except al.NoRunError as err:
        st.warning(md_escape(err))
        return
    except SchemaError as err:
        st.error(f"The decoder in {md_escape(run_dir)} does not match this app: {md_escape(err)}")
        return
    except (CbvaeError, OSError, RuntimeError, ValueError, KeyError) as err:
        st.error(
            f"Could not load the run {md_escape(run_dir)}: {type(err).__name__}: {md_escape(al.one_line(err, 300))}"
        )
        return
    dataset_dir = dataset_dir or info.dataset_dir
    dataset = load_dataset(str(dataset_dir)) if dataset_dir else None
    if isinstance(dataset, str):
        st.warning(f"Going on without the dataset: {md_escape(dataset)}", icon="⚠️")
        dataset = None
    data_key = str(dataset_dir) if dataset is not None else None
    st.caption(
        f"Loaded run {md_escape(run_dir)} · {md_escape(info.export_id)} · model {md_escape(info.model_kind)} · "
        f"{info.latent_size} latents · {len(info.latents)} studies · dataset: "
        f"{md_escape(dataset_dir) if dataset is not None else 'not available'} · "
        "a run folder is code: open only runs you trust"
    )

    first_run = "_start_key" not in st.session_state
    overrides, _ = read_url(info) if first_run else ({}, None)
    for note in st.session_state.get("_url_notes", []):
        st.warning(md_escape(note), icon="⚠️")
    start, upload = pick_start(info, dataset, key, stamp, data_key)
    if start is None:  # "Your study" without a file read
        if isinstance(upload, str):
            st.error(md_escape(upload))
        else:
            st.info("Upload a study in the sidebar: a Sleuth/GingerALE text file, a CSV/TSV of x, y, z with a space "
                    "column, a NiMARE dataset JSON or a NIfTI map (bundle/docs/study.md lists the formats).")  # fmt: skip
        return
    imputed: dict[str, float] = {}
    if upload is not None:  # the imputation head's values for the uploaded map's missing fields
        imputed = {k: float(v) for k, v in (upload[1].decode_info.get("imputed") or {}).items()}
    if data_key is not None and start.study_id is not None:
        imputed, note = study_imputed(key, stamp, data_key, start.key)
        if note:
            st.sidebar.caption(md_escape(note))
    if info.schema.n_topics and not start.upload:  # the study's own topic mixture (None: unknown or no dataset)
        study_topics = dataset_vectors(key, stamp, data_key) if data_key is not None else None
        start.conditions["topics"] = al.start_topics(info, study_topics, start.study_id)
    if info.schema.term_dims and not start.upload:  # the study's own text (None: none, or no dataset)
        study_terms = dataset_vectors(key, stamp, data_key, "terms") if data_key is not None else None
        start.conditions["terms"] = al.start_terms(info, study_terms, start.study_id)
    if st.session_state.get("_start_key") != start.key:
        apply_start(info, start, imputed)
        st.session_state.update(overrides)
        if "_url_topics" in overrides:
            set_topics(info, st.session_state.pop("_url_topics"))
        st.session_state["_start_key"] = start.key
    z = latent_sliders(info, start, imputed)

    vocab = load_vocabulary(key, stamp)
    tokeniser = find_tokeniser() if vocab is not None or info.embedder is not None else ""
    topics, words = ask_in_words(info, vocab, tokeniser)
    conditions, notes = condition_widgets(info, imputed)
    if info.schema.n_topics:
        conditions["topics"] = topics
    if info.schema.term_dims:  # the typed terms, else the starting study's own text
        typed = text_terms(info, tokeniser, words)
        conditions["terms"] = typed if typed is not None else start.conditions.get("terms")
    has_contrast = any(conditions.get(k) is not None for k in CONTENT)
    st.session_state.setdefault("strength", 1.0)
    strength = st.slider(
        "Condition strength (scales the task and topic contrast: 0 = unknown, 1 = as given)",
        *us.STRENGTH_RANGE, step=0.1, key="strength", disabled=not has_contrast,
    )  # fmt: skip
    strength = float(strength) if has_contrast else 1.0
    cut, threshold = view_controls(renderer)

    allow = bool(notes)
    query = make_query(z, conditions, allow, imputed)
    t0 = time.perf_counter()
    try:
        current = decode_cached(key, stamp, query.key, query, strength)
        ref = make_query(start.z, start.conditions, True, imputed)
        reference = decode_cached(key, stamp, ref.key, ref)
        others = {"the starting point": reference}
        if has_contrast:
            others["task, topics & terms unknown" if info.schema.term_dims else "task & topics unknown"] = decode_pair(
                key, stamp, query.key, query
            )[1]
    except SchemaError as err:
        st.error(f"These conditions are not valid for this decoder: {md_escape(err)}")
        return
    decode_ms = (time.perf_counter() - t0) * 1000
    st.session_state["_peak"] = renderer.peak_mm(current)

    low, top = al.value_range([current], info.mask)
    level = low + threshold * (top - low)
    st.subheader("Generated map")
    st.caption(f"{GENERATED_LABEL} · start: {md_escape(start.label)}")
    left, right = st.columns([3, 2])
    left.image(
        renderer.ortho(current, cut, vmin=low, vmax=top, threshold=level, title=GENERATED_LABEL),
        caption="Generated · orthogonal slices on the 2 mm MNI152 template",
    )
    right.image(
        renderer.glass_brain(current, vmin=low, vmax=top, threshold=level, title=GENERATED_LABEL),
        caption="Generated · glass brain (maximum-intensity projections)",
    )
    spread = spread_cached(key, stamp, make_query(np.zeros_like(z), conditions, allow, imputed).key, query)
    real = real_map(data_key, start.study_id) if data_key is not None and start.study_id is not None else None
    if upload is not None:
        your_study_view(info, renderer, upload[0], upload[1], cut, threshold)
    elif real is not None:
        st.image(
            renderer.ortho(real, cut, vmax=1.0, threshold=threshold),
            caption="Real map of the starting study (data: MA map, scaled to its peak)",
        )
    elif start.seed is not None:
        st.info("A prior draw has no real map.")
    else:
        st.info("Real map not shown: pass `--dataset_dir DATA` (or `CBVAE_DATASET_DIR`) to see the study's own map.")
    uncertainty_view(info, renderer, spread, cut, threshold)

    difference_view(info, renderer, load_regions(key, stamp), current, others, cut, threshold)
    if vocab is not None:
        contrast_view(info, renderer, load_regions(key, stamp), vocab, tokeniser, query, cut, threshold, key, stamp)
    evidence_view(info, renderer, data_key, topics, query, current, cut, threshold, key, stamp)
    sweep_ms = sweep_view(info, renderer, query, z, conditions, start, cut, threshold, key, stamp)

    st.download_button(
        "Download the generated map (NIfTI)",
        data=lambda: dl.nifti_bytes(dl.generated_nifti(current, info.affine, intent="generated")),
        file_name="generated_counterfactual.nii.gz", mime="application/gzip", key="download",
    )  # fmt: skip
    if st.toggle("Interactive viewer (nilearn view_img, ~0.5 s per map)", key="viewer"):
        html = viewer_html(key, stamp, query.key, query, strength, level, top, cut)
        # st.iframe replaces components.v1.html in recent Streamlit; both embed brainsprite's inline scripts
        if hasattr(st, "iframe"):
            st.iframe(html, height=460)
        else:
            components.html(html, height=460)

    moved = not np.allclose(z, start.z, atol=1e-6)
    params = us.state_params(
        run=info.run_dir.name,
        study=start.study_id,
        seed=start.seed,
        z=z if moved or start.upload else None,  # an upload is not in the run: the link carries its code
        conditions=conditions,
        query=words,
        contrast=(st.session_state.get("contrast_a", ""), st.session_state.get("contrast_b", "")),
        topics=None if topics is None else {t: float(w) for t, w in enumerate(topics)},
        strength=strength,
        sweep=st.session_state.get("sweep", "year"),
    )
    if not info.schema.n_topics:
        params.pop("topics", None)
    st.query_params.from_dict(params)
    total_ms = (time.perf_counter() - t_start) * 1000
    st.caption(
        f"this interaction: {total_ms:.0f} ms · decode {decode_ms:.0f} ms · sweep decode {sweep_ms:.0f} ms"
        + (" · extrapolating" if allow else "")
    )


def run() -> None:
    """Entry point: every error becomes a one-line message on the page, never a traceback."""
    try:
        main()
    except Exception as err:  # noqa: BLE001 - the page must stay usable; the traceback goes to the log
        logger.exception("app error")
        st.error(f"error: {type(err).__name__}: {md_escape(al.one_line(err, 300))}")


run()
