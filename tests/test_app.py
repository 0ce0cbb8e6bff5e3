"""The Counterfactual Machine: its logic (paths, ranges, words, URL state, evidence, regions, rendering,
downloads) and the page itself through Streamlit's AppTest on a tiny run trained by the bundle."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from study_files import test_split_studies, write_csv, write_nimare_json, write_sleuth

from cbvae_ext.app import downloads as dl
from cbvae_ext.app import evidence as ev
from cbvae_ext.app import keys
from cbvae_ext.app import session as al
from cbvae_ext.app import state as us
from cbvae_ext.app.markup import WORD_JOINER, md_escape
from cbvae_ext.app.regions import RegionLabeller
from cbvae_ext.app.render import SliceRenderer
from cbvae_ext.app.serving import ALLOW_REMOTE_ENV, remote_refusal
from cbvae_ext.app.terms import SYNONYMS_FILE, VOCABULARY_FILE, QueryTokeniser, Term
from cbvae_ext.app.words import MAX_WORDS, TopicVocabulary
from cbvae_ext.run_folder import RunFolderError
from cbvae_ext.schema import MetadataSchema, SchemaError

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "streamlit_app.py"
MNI4 = np.array([[-4.0, 0, 0, 90], [0, 4, 0, -126], [0, 0, 4, -72], [0, 0, 0, 1]])
SHAPE4 = (46, 55, 46)
#: NeuroQuery's test fixture (its 7,547-term vocabulary, unchanged) and two entries of its released synonym map.
NEUROQUERY_FIXTURE = REPO / "tests" / "data" / "neuroquery"
SYNONYMS = {"nociception": "nociceptive", "reaction times": "reaction time"}


@pytest.fixture(scope="module")
def app_run(tiny_runs: dict[str, Path]) -> Path:
    """The C-β-VAE run trained by the bundle command on the tiny dataset."""
    return tiny_runs["cbvae"]


def _schema() -> MetadataSchema:
    return MetadataSchema.fit(["other", "working_memory"], {"year": np.array([2000.0, 2004.0, 2012.0])})


# ----- session logic ----------------------------------------------------------------------------------


def test_resolve_paths_order_cli_env_default(tmp_path: Path) -> None:
    root = tmp_path
    assert al.resolve_paths([], {}, root) == (root / "runs" / "cbvae", None)
    assert al.resolve_paths([], {"CBVAE_RUN_DIR": "r", "CBVAE_DATASET_DIR": "/d"}, root) == (root / "r", Path("/d"))
    argv = ["-x", "--run_dir", "/abs/run", "--dataset_dir=data"]
    assert al.resolve_paths(argv, {"CBVAE_RUN_DIR": "r"}, root) == (Path("/abs/run"), root / "data")


def test_slider_ranges_and_extrapolation_flags() -> None:
    schema = _schema()
    lo, hi, step = al.slider_spec(schema, "year")
    assert (lo, hi, step) == (1990, 2026, 1) and isinstance(lo, int)
    assert al.extrapolation_note(schema, "year", 2004.0) is None
    assert "[2000, 2012]" in al.extrapolation_note(schema, "year", 2020.0)
    assert al.extrapolation_note(schema, "year", None) is None
    # never observed in training: any value is an extrapolation
    assert "never observed" in al.extrapolation_note(schema, "fwhm", 8.0)
    assert al.slider_spec(schema, "fwhm") == (0.0, 20.0, 0.5)
    assert al.slider_value(schema, "fwhm", 7.3) == 7.5 and al.slider_value(schema, "year", 1950) == 1990
    assert al.sweep_values(schema, "year") == [2000, 2002, 2005, 2007, 2010, 2012]
    assert al.sweep_values(schema, "fwhm", 5) == [0.0, 5.0, 10.0, 15.0, 20.0]  # unobserved: the slider range
    assert al.field_label("fwhm") == "Smoothing FWHM (mm)"  # declared once, in the schema


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), float("1e400")])
def test_slider_value_refuses_non_finite_values(value: float) -> None:
    # ?year=inf used to raise OverflowError inside round() and kill the session
    with pytest.raises(SchemaError, match="year must be a finite number"):
        al.slider_value(_schema(), "year", value)


def test_filter_studies_and_study_start(tmp_path: Path) -> None:
    schema = _schema()
    latents = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "title": ["Working memory load", None, "Memory and attention"],
            "year": [2003.0, np.nan, 2010.0],
            "category": ["working_memory", None, "unknown_category"],
            "split": ["train", "val", "test"],
        }
    )
    assert al.filter_studies(latents, "MEMORY")["id"].tolist() == ["a", "c"]
    assert al.filter_studies(latents, "", "working_memory")["id"].tolist() == ["a"]
    assert al.filter_studies(latents, "memory", None, "test")["id"].tolist() == ["c"]
    mu = np.array([[0.5, -9.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    info = al.RunInfo(
        tmp_path,
        schema,
        2,
        np.array([1, 0]),
        np.array([0.1, 0.2]),
        {},
        latents,
        mu,
        np.ones((2, 2, 2), bool),
        np.eye(4),
    )
    start = al.study_start(info, "a")
    assert start.conditions == {
        "task": "working_memory", "year": 2003.0, "sample_size": None, "field_strength": None, "fwhm": None,
    }  # fmt: skip
    np.testing.assert_allclose(start.z, [0.5, -6.0])  # clipped into the slider range
    missing = al.study_start(info, "b")
    assert missing.conditions["task"] is None and missing.conditions["year"] is None
    assert al.study_start(info, "c").conditions["task"] is None  # a category the schema does not know
    meta = pd.DataFrame(
        {"id": ["a"], "sample_size": [24.0], "sample_size_observed": [True], "fwhm": [np.nan], "fwhm_observed": [False]}
    )
    assert al.study_start(info, "a", meta).conditions["sample_size"] == 24
    prior = al.prior_start(info, 3)
    np.testing.assert_allclose(prior.z, al.prior_start(info, 3).z)
    assert prior.key == "prior:3" and all(v is None for v in prior.conditions.values())
    assert (prior.seed, prior.study_id, start.seed, start.study_id) == (3, None, None, "a")
    # topic rows follow latents.parquet's order; unobserved rows are NaN
    info.schema.topic_names, info.schema.topic_keys = ["t0", "t1"], ["a b", "c d"]
    meta = pd.DataFrame(
        {"id": ["c", "a", "b"], "topic_00": [0.2, 0.9, 0.0], "topic_01": [0.8, 0.1, 0.0],
         "topics_observed": [True, True, False]}
    )  # fmt: skip
    topics = al.study_vectors(info, meta)
    np.testing.assert_allclose(topics[[0, 2]], [[0.9, 0.1], [0.2, 0.8]])
    assert np.isnan(topics[1]).all()
    np.testing.assert_allclose(al.start_topics(info, topics, "a"), [0.9, 0.1])
    meta.loc[1, "topic_00"] = 0.904
    np.testing.assert_allclose(al.start_topics(info, al.study_vectors(info, meta), "a"), [0.9, 0.1])  # slider grid
    assert al.start_topics(info, topics, "b") is None and al.start_topics(info, topics, None) is None


def test_load_run_info_reports_mismatches(tmp_path: Path) -> None:
    """The app opens runs with RunFolder: the same checks and one-line messages as inference and evaluation."""
    with pytest.raises(al.NoRunError, match="python -m monai.bundle run training"):
        al.load_run_info(tmp_path / "nothing")
    run = tmp_path / "run"
    run.mkdir()
    for name in al.RUN_FILES:
        (run / name).write_text("")
    (run / "decoder_schema.json").write_text(json.dumps({"latent_size": 2}))
    with pytest.raises(RunFolderError, match="decoder_schema.json lacks model, meta_schema, grid"):
        al.load_run_info(run)
    spec = {
        "latent_size": 2,
        "model": "cbvae",
        "meta_schema": _schema().to_dict(),
        "grid": {"shape": [2, 2, 2], "affine": np.eye(4).tolist()},
        "latent_kl": [1.0],
    }
    (run / "decoder_schema.json").write_text(json.dumps(spec))
    with pytest.raises(RunFolderError, match="latent_kl has 1 entries but latent_size is 2"):
        al.load_run_info(run)
    spec["latent_kl"] = None  # not recorded: ranked by the posterior means' KL
    (run / "decoder_schema.json").write_text(json.dumps(spec))
    with pytest.raises(RunFolderError, match="latents.parquet is unreadable"):
        al.load_run_info(run)
    latents = {"id": ["a"], "title": ["t"], "year": [2001.0], "category": ["other"], "split": ["train"]}
    pd.DataFrame({**latents, "mu": [[0.1, 0.2, 0.3]]}).to_parquet(run / "latents.parquet")
    with pytest.raises(RunFolderError, match="mu has 3 entries per study but latent_size is 2"):
        al.load_run_info(run)
    pd.DataFrame({**latents, "mu": [[0.1, -2.0]]}).to_parquet(run / "latents.parquet")
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4)), run / "mask.nii.gz")
    (run / "decoder.ts").write_bytes(b"decoder bytes")
    info = al.load_run_info(run)
    assert info.kl_order.tolist() == [1, 0]
    assert info.imputed_defaults["year"] == pytest.approx(np.mean([2000, 2004, 2012]))
    assert info.export_id.startswith("decoder.ts sha256 a8580e6f444f")  # which export the page says it loaded


def test_damaged_dataset_is_one_line_error(tmp_path: Path) -> None:
    assert al.load_dataset_rows(tmp_path) is None  # absent: no dataset, no error
    np.save(tmp_path / "maps.npy", np.zeros((2, 2, 2, 2), np.float32))
    (tmp_path / "metadata.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(al.DatasetUnreadable, match=r"metadata.parquet|is unreadable") as err:
        al.load_dataset_rows(tmp_path)
    assert "\n" not in str(err.value) and "without --dataset_dir" in str(err.value)
    pd.DataFrame({"id": ["a", "b", "c"]}).to_parquet(tmp_path / "metadata.parquet")
    with pytest.raises(al.DatasetUnreadable, match=r"maps.npy \(2, 2, 2, 2\) does not match metadata.parquet \(3 rows"):
        al.load_dataset_rows(tmp_path)


def test_dataset_edited_after_its_build_is_refused(tmp_path: Path, tiny_dataset: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    assert al.load_dataset_rows(copy) is not None  # intact: opens
    meta = pd.read_parquet(copy / "metadata.parquet")
    meta.iloc[::-1].reset_index(drop=True).to_parquet(copy / "metadata.parquet")  # every map another study's row
    with pytest.raises(al.DatasetUnreadable, match=r"metadata.parquet") as err:
        al.load_dataset_rows(copy)
    assert "\n" not in str(err.value) and "rebuild" in str(err.value)


def _plain(text: str) -> str:
    """Markdown source as it reads on the page (backslash escapes and word joiners removed)."""
    return re.sub(r"\\(.)", r"\1", text).replace(WORD_JOINER, "")


#: remark-gfm's autolink literals, applied to the text after escapes are resolved (as Streamlit's renderer does)
GFM_AUTOLINKS = re.compile(r"(https?://|www(?=\.))[-.\w]+|[-.\w+]+@[-\w]+(\.[-\w]+)+", flags=re.IGNORECASE | re.ASCII)


def _markup(source: str) -> list[str]:
    """Everything but plain text that CommonMark renders from ``source`` (links, images, HTML, code, emphasis,
    headings, lists), GFM's autolink literals and Streamlit's ``:colour[...]`` / ``:icon:`` directives."""
    from markdown_it import MarkdownIt

    plain = {"paragraph_open", "paragraph_close", "inline", "text", "text_special", "softbreak"}
    found = []
    for token in MarkdownIt("commonmark").parse(source):
        for t in [token, *(token.children or [])]:
            if t.type not in plain:
                found.append(f"{t.type}: {t.content or t.attrs}")
            elif t.type in ("text", "text_special"):
                found += [f"autolink: {m.group()}" for m in GFM_AUTOLINKS.finditer(t.content)]
    text = "".join(t.content for token in MarkdownIt("commonmark").parse(source) for t in token.children or [])
    found += [f"autolink: {m.group()}" for m in GFM_AUTOLINKS.finditer(text)]  # across escaped characters
    found += [f"directive: {m.group()}" for m in re.finditer(r"(?<!\\):[\w/]+[\[:]", source)]
    return found


@pytest.mark.parametrize(
    "text",
    [
        "<img src=x onerror=alert(1)> [link](javascript:x) **bold** `code`\nline",
        "`[Log in](https://ev.il/x)", "![t](https://ev.il/t.png)", "<https://ev.il>", "https://ev.il/x www.ev.il",
        "mail me@ev.il", "[a]: https://ev.il\n[a]", ":red[alarm] :material/lock:", "# heading\n- list",
    ],
)  # fmt: skip
def test_markdown_escape_keeps_user_text_inert(text: str) -> None:
    assert _markup(text)  # each is markup when shown raw
    escaped = md_escape(text)
    assert _markup(escaped) == [] and _markup(f"ignored task={escaped} in the link: why") == []
    assert re.search(r"(?<!\\)[<>\[\]()*`:/@]", escaped) is None and "\n" not in escaped
    assert _plain(escaped) == text.replace("\n", " ")  # shown as typed


def test_remote_refusal_allows_loopback_only() -> None:
    for address in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert remote_refusal(address, {}) is None
    for address in (None, "", "0.0.0.0", "::", "192.168.1.5", "example.org"):
        why = remote_refusal(address, {})
        assert why and "--server.address 127.0.0.1" in why and ALLOW_REMOTE_ENV in why and "\n" not in why
        assert remote_refusal(address, {ALLOW_REMOTE_ENV: "1"}) is None
        assert remote_refusal(address, {ALLOW_REMOTE_ENV: "yes"}) is not None  # only the documented opt-in


# ----- ask in words -----------------------------------------------------------------------------------


def _vocab() -> TopicVocabulary:
    keys = [
        "memory working wm load task",  # 0
        "memory retrieval encoding hippocampus recognition",  # 1
        "pain somatosensory stimulation painful touch",  # 2
        "face faces facial expressions amygdala",  # 3
        "cortex network task memory motor",  # 4
    ]
    return TopicVocabulary(keys, [f"{i}_{k.split()[0]}" for i, k in enumerate(keys)])


def test_words_map_to_topics_by_the_documented_rule() -> None:
    vocab = _vocab()
    # a phrase whose two words share a topic goes to that topic only
    wm = vocab.match("Working Memory")
    assert wm.top(1) == [(0, pytest.approx(1.0))] and wm.matched == [("working memory", [0])]
    # a single word is shared by rank: "memory" is top of topics 0 and 1 (1/1 each) and 4th of topic 4 (1/4)
    memory = vocab.match("memory")
    np.testing.assert_allclose(memory.weights, np.array([1, 1, 0, 0, 0.25]) / 2.25, rtol=1e-6)
    # plural fallback, stop words and unknown words are reported, and the mixture sums to 1
    mixed = vocab.match("pain, faces and the brain of xyzzy")
    assert {t for t, _ in mixed.top(5)} == {2, 3} and mixed.weights.sum() == pytest.approx(1.0)
    assert ("xyzzy", "not in the topics") in mixed.ignored and ("brain", "stop word") in mixed.ignored
    assert vocab.match("painfuls").top(1)[0][0] == 2  # "painfuls" -> "painful"
    n_back = vocab.match("n-back")
    assert n_back.empty and ("n", "too short") in n_back.ignored


@pytest.fixture(scope="module")
def tokeniser() -> QueryTokeniser:
    return QueryTokeniser((NEUROQUERY_FIXTURE / VOCABULARY_FILE).read_text().splitlines(), SYNONYMS)


def test_neuroquery_tokeniser_reads_phrases_synonyms_and_reports_the_rest(tokeniser: QueryTokeniser) -> None:
    assert tokeniser.n_terms > 7000  # NeuroQuery's vocabulary, less the synonyms it maps away
    tokens = tokeniser("Theory of Mind, nociception and reaction times: xyzzy!")
    assert tokens.terms == [
        Term("theory mind", "Theory of Mind"), Term("nociceptive", "nociception", True),
        Term("reaction time", "reaction times", True),
    ]  # fmt: skip
    assert [str(t) for t in tokens.terms][1] == "nociception → nociceptive"
    assert tokens.ignored == [("and", "stop word"), ("xyzzy", "not in NeuroQuery's vocabulary")]  # "of": in a term
    assert tokeniser("reward anticipation").terms == [Term("reward anticipation", "reward anticipation")]
    # the folder reader: the vocabulary file, and the synonym map when it lies beside it
    assert QueryTokeniser.from_directory(NEUROQUERY_FIXTURE)("nociception").terms == [
        Term("nociception", "nociception")
    ]


@pytest.mark.parametrize(
    ("text", "terms", "ignored"),
    [
        ("", [], []),
        ("   \n\t", [], []),
        (
            "<script>alert(1)</script> <b>pain</b> [touch](javascript:void) &amp; **faces**",
            ["alert", "pain", "touch", "faces"],
            ["script", "1", "script", "javascript", "void", "amp"],
        ),  # markup is read as words, never as markup
        ("記憶 痛み память amygdala", ["amygdala"], ["記憶", "痛み", "память"]),
        ("x" * 10_000, [], ["x" * 40 + "…"]),
        ("\x00\u202e pain\u200b", ["pain"], []),
        ("ｐａｉｎ", ["pain"], []),  # full-width letters: NFKC
    ],
)
def test_neuroquery_tokeniser_edge_cases(tokeniser: QueryTokeniser, text: str, terms: list, ignored: list) -> None:
    tokens = tokeniser(text)
    assert [t.term for t in tokens.terms] == terms
    assert [w for w, _ in tokens.ignored][: len(ignored)] == ignored and tokens.truncated == 0
    assert all(len(w) <= 41 for w, _ in tokens.ignored)


def test_neuroquery_tokeniser_reads_the_first_words_only(tokeniser: QueryTokeniser) -> None:
    tokens = tokeniser("pain " * 2_000)
    assert len(tokens.terms) == MAX_WORDS and tokens.truncated == 2_000 - MAX_WORDS


def test_neuroquery_tokeniser_is_shared_safely_between_sessions(tokeniser: QueryTokeniser) -> None:
    # the page's sessions share one cached tokeniser, and NeuroQuery's pipeline keeps positions on itself
    from concurrent.futures import ThreadPoolExecutor

    texts = ["theory of mind and pain", "reward anticipation " * 20, "nociception in the insula", "xyzzy faces"]
    expected = [tokeniser(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(tokeniser, texts * 100))
    assert results == expected * 100


def test_terms_map_to_topics_through_their_words(tokeniser: QueryTokeniser) -> None:
    vocab = _vocab()
    # a phrase goes to the topics that list all its words; a synonym is looked up in NeuroQuery's form
    match = vocab.match_terms(tokeniser("working memory"))
    assert match.top(1) == [(0, pytest.approx(1.0))] and match.matched == [("working memory", [0])]
    faces = vocab.match_terms(tokeniser("Faces"))
    assert faces.matched == [("Faces", [3])] and faces.top(1)[0][0] == 3
    # no topic lists the whole phrase: its words count on their own; a term no topic lists is reported
    match = vocab.match_terms(tokeniser("memory retrieval, theory of mind"))
    assert match.matched == [("memory retrieval", [1])] and match.no_topic == ["theory of mind"]
    match = vocab.match_terms(tokeniser("face recognition"))
    assert match.matched == [("face recognition (by its words face, recognition)", [1, 3])]
    assert {t for t, _ in match.top(5)} == {1, 3} and match.weights.sum() == pytest.approx(1.0)
    # a word NeuroQuery lacks is still looked up among the topics' key words; stop words are not
    rest = TopicVocabulary(["network state resting rsns fcmri"])  # two of LDA50's key words NeuroQuery lacks
    match = rest.match_terms(tokeniser("fcmri the xyzzy"))
    assert match.matched == [("fcmri (topic key word)", [0])] and match.top(1) == [(0, pytest.approx(1.0))]
    assert match.ignored == [("the", "stop word"), ("xyzzy", "not in NeuroQuery's vocabulary")]
    assert vocab.match_terms(tokeniser("")).empty


@pytest.mark.parametrize(
    "text",
    ["", "   ", "<script>alert(1)</script>", "記憶 痛み память", "x" * 10_000, "memory " * 2_000, "\x00\u202e"],
)
def test_words_never_fail_on_odd_text(text: str) -> None:
    match = _vocab().match(text)
    assert match.weights.shape == (5,) and np.isfinite(match.weights).all()
    assert match.empty or match.weights.sum() == pytest.approx(1.0)
    assert all(len(word) <= 41 for word, _ in match.ignored)  # a 10,000-character word is shortened
    if text.startswith("memory "):
        assert match.truncated == 2_000 - MAX_WORDS


# ----- URL state --------------------------------------------------------------------------------------

_FIELDS = {"year": (1990, 2026), "sample_size": (1, 2000), "field_strength": (0.5, 9.4), "fwhm": (0.0, 20.0)}


def _parse(params: dict[str, str]) -> tuple[us.UrlState, list[str]]:
    return us.parse_state(
        params, study_ids={"ns:1", "ns:2"}, categories=["pain", "other"], fields=_FIELDS, latent_size=3, n_topics=5
    )


def test_url_state_round_trips() -> None:
    conditions = {"task": "pain", "year": 2005.0, "sample_size": None, "field_strength": 3.0, "fwhm": None}
    params = us.state_params(
        run="run1", study="ns:1", seed=None, z=np.array([0.5, -1.25, 2.0]), conditions=conditions,
        query="working memory", topics={1: 0.25, 3: 0.75, 4: 0.0}, strength=1.5, sweep="fwhm",
        contrast=("pain", "touch"),
    )  # fmt: skip
    state, notes = _parse(params)
    assert notes == [] and state.contrast == ("pain", "touch")
    assert (state.run, state.study, state.seed, state.task) == ("run1", "ns:1", None, "pain")
    np.testing.assert_allclose(state.z, [0.5, -1.25, 2.0])
    assert state.values == {"year": 2005.0, "sample_size": None, "field_strength": 3.0, "fwhm": None}
    assert (state.query, state.topics, state.strength, state.sweep) == (
        "working memory",
        {1: 0.25, 3: 0.75},
        1.5,
        "fwhm",
    )
    unknown = us.state_params(
        run="r",
        study=None,
        seed=7,
        z=None,
        conditions={"task": None},
        query="",
        topics=None,
        strength=1.0,
        sweep="year",
    )
    state, notes = _parse(unknown)
    assert notes == [] and state.seed == 7 and state.task == "unknown" and state.topics == {}
    assert state.contrast is None and "qa" not in unknown
    state, notes = _parse({"qb": "x" * 5000})
    assert state.contrast == ("", "x" * us.MAX_QUERY_CHARS) and notes == [
        f"query B in the link: cut to the first {us.MAX_QUERY_CHARS} characters"
    ]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"year": "inf"}, "year"), ({"year": "1e400"}, "year"), ({"year": "nan"}, "year"), ({"year": "3000"}, "year"),
        ({"sample_size": "-5"}, "sample_size"), ({"task": "<b>x</b>"}, "task"), ({"study": "nope"}, "study"),
        ({"seed": "-1"}, "seed"), ({"seed": "٣"}, "seed"), ({"z": "1,2"}, "z"), ({"z": "1,inf,2"}, "z"),
        ({"topics": "9:1"}, "topics"), ({"topics": "1:-0.5"}, "topics"), ({"topics": "a:b"}, "topics"),
        ({"strength": "1e9"}, "strength"), ({"sweep": "iq"}, "sweep"),
    ],
)  # fmt: skip
def test_invalid_url_parameters_give_a_message_and_the_default(params: dict[str, str], name: str) -> None:
    state, notes = _parse(params)
    assert len(notes) == 1 and notes[0].startswith(f"ignored {name}=") and "\n" not in notes[0]
    assert state == us.UrlState()  # every field at its default


def test_unknown_url_parameters_are_reported() -> None:
    # state.py promised a message for anything else; unknown parameters used to be dropped silently
    state, notes = _parse({"yaer": "2003", "task": "pain", "embed": "true", "embed_options": "dark_theme"})
    assert state.task == "pain" and len(notes) == 1  # Streamlit's own embed parameters are Streamlit's
    assert notes[0].startswith("ignored yaer=2003 in the link: not a parameter of this page")
    assert "task" in notes[0] and "fwhm" in notes[0]  # names the parameters it reads
    state, notes = _parse({"x" * 100: "y" * 100})
    assert len(notes) == 1 and len(notes[0]) < 300


# ----- evidence, regions, downloads -------------------------------------------------------------------


def test_evidence_ranks_studies_by_topic_similarity() -> None:
    studies = pd.DataFrame(
        {
            "id": list("abcdef"),
            "title": list("ABCDEF"),
            "year": [2001, 2005, 2010, 2003, 2012, 2008],
            "category": ["pain", "pain", "pain", "other", "other", "pain"],
            "split": ["train", "test", "train", "train", "val", "val"],
        }
    )
    topics = np.array([[1, 0, 0], [0.6, 0.4, 0], [0, 0, 1], [1, 0, 0], [0.9, 0.1, 0], [np.nan] * 3])
    found = ev.find_evidence(studies, topics, np.array([1.0, 0, 0]), None, n_list=2, n_mean=3)
    assert found.training["id"].tolist() == ["a", "d"] and found.held_out["id"].tolist() == ["e", "b"]
    assert found.training["similarity"].tolist() == [1.0, 1.0] and found.matching == ["a", "d", "e"]
    pain = ev.find_evidence(studies, topics, np.array([1.0, 0, 0]), "pain")
    assert set(pain.training["category"]) | set(pain.held_out["category"]) == {"pain"}
    assert "f" not in pain.matching  # unknown topics are not near anything
    by_task = ev.find_evidence(studies, None, None, "pain")
    assert by_task.training["id"].tolist() == ["c", "a"] and by_task.held_out["id"].tolist() == ["f", "b"]
    assert ev.find_evidence(studies, topics, None, None) is None
    a = np.arange(8.0).reshape(2, 2, 2)
    assert ev.map_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert ev.map_correlation(a, -a) == pytest.approx(-1.0) and np.isnan(ev.map_correlation(a, np.ones_like(a)))


def test_what_changed_names_the_atlas_regions() -> None:
    mask = np.ones(SHAPE4, bool)
    labeller = RegionLabeller(MNI4, SHAPE4, mask)
    diff = np.zeros(SHAPE4, np.float32)

    def blob(xyz: tuple[float, float, float], value: float) -> None:
        ijk = np.rint(np.linalg.solve(MNI4, [*xyz, 1.0])[:3]).astype(int)
        diff[tuple(slice(c - 1, c + 2) for c in ijk)] = value

    blob((-46.0, -19.0, 7.0), 0.01)  # left Heschl's gyrus gains
    blob((17.0, -96.0, 8.0), -0.02)  # right occipital pole loses
    gained, lost = labeller.summary(diff, n=1)
    assert gained[0].name == "left Heschl's Gyrus" and gained[0].mean_change > 0
    assert lost[0].name == "right Occipital Pole" and lost[0].mean_change < 0


def test_what_changed_names_subcortical_regions() -> None:
    """A change at the thalamus and the insula (pain's pattern) names the thalamus, from Seitzman's spheres."""
    labeller = RegionLabeller(MNI4, SHAPE4, np.ones(SHAPE4, bool))
    diff = np.zeros(SHAPE4, np.float32)
    for xyz, value in (((-10.0, -18.0, 8.0), 0.03), ((38.0, 4.0, 4.0), 0.01)):  # left thalamus, right insula
        ijk = np.rint(np.linalg.solve(MNI4, [*xyz, 1.0])[:3]).astype(int)
        diff[tuple(slice(c - 1, c + 2) for c in ijk)] = value
    gained, _ = labeller.summary(diff, n=3)
    names = [c.name for c in gained]
    assert names[0] == "left thalamus" and "right Insular Cortex" in names, names
    assert {"left amygdala", "right cerebellum", "left basal ganglia", "right hippocampus"} <= set(labeller.names)


def test_prior_spread_is_the_sd_of_sampled_maps(app_run: Path) -> None:
    from cbvae_ext import inference
    from cbvae_ext.app.uncertainty import prior_spread

    model = inference.load(app_run)
    spread = prior_spread(model, {}, n=4, seed=1)
    z = np.random.default_rng(1).standard_normal((4, model.latent_size)).astype(np.float32)
    maps = np.stack([model.decode(row, {}).map for row in z])
    np.testing.assert_allclose(spread, maps.std(axis=0), atol=1e-6)
    assert spread.shape == model.mask.shape and spread[model.mask].max() > 0 and not spread[~model.mask].any()
    with pytest.raises(ValueError, match="at least 2"):
        prior_spread(model, {}, n=1)


def test_renderer_draws_on_the_2mm_template_where_mni_says() -> None:
    # 4 mm grid with the x axis flipped (as in FSL's templates): the display must still be RAS/neurological
    renderer = SliceRenderer(MNI4, SHAPE4, panel_px=110)
    assert renderer.shape == (99, 117, 95)  # nilearn's 2 mm MNI152 template is the display grid
    volume = np.zeros(SHAPE4, np.float32)
    ijk = np.rint(np.linalg.solve(MNI4, [42.0, 18.0, 32.0, 1.0])[:3]).astype(int)
    volume[tuple(ijk)] = 1.0  # a right, anterior, superior voxel
    assert renderer.peak_mm(volume) == (42.0, 18.0, 32.0)
    tile = renderer.axial(volume, 32.0, cmap="autumn", vmax=1.0, threshold=0.3)  # yellow: no blue
    hot = np.argwhere((tile[..., 0] > 200) & (tile[..., 2] < 50))
    # one 4 mm voxel spreads over ~2x2 display voxels (trilinear), each drawn as a block of pixels
    assert 4 <= len(hot) <= 40
    row, col = hot.mean(axis=0)
    assert col > tile.shape[1] / 2  # right hemisphere on the right
    assert row < tile.shape[0] / 2  # anterior at the top
    glass = renderer.glass_brain(volume, vmax=1.0, threshold=0.3, title="GENERATED")
    assert glass.dtype == np.uint8 and ((glass[..., 0] > 200) & (glass[..., 2] < 80)).sum() > 10
    ortho = renderer.ortho(volume, (42.0, 18.0, 32.0), vmax=1.0, threshold=0.3)
    assert ortho.dtype == np.uint8 and ortho.shape[0] > 100
    assert renderer.bounds_mm()[0] == (-98.0, 98.0)


def test_downloads_say_they_are_generated() -> None:
    maps = np.random.default_rng(0).random((3, *SHAPE4)).astype(np.float32)
    img = nib.Nifti1Image.from_bytes(
        __import__("gzip").decompress(dl.nifti_bytes(dl.generated_nifti(maps, MNI4, intent="sweep year")))
    )
    assert img.shape == (*SHAPE4, 3) and np.allclose(img.get_fdata()[..., 2], maps[2])
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == dl.GENERATED_DESCRIPTION
    np.testing.assert_allclose(img.affine, MNI4)
    side = json.loads(
        dl.sweep_sidecar(
            run_dir="runs/x", export_id="decoder.ts sha256 abc", field="year", values=[2000, 2010],
            conditions={"task": "pain", "year": 2005.0, "topics": np.array([0.5, 0.5])}, z=np.zeros(3),
            start="ns:1", version="0.1.0",
        )
    )  # fmt: skip
    assert side["generated"] is True and side["swept_condition"] == "year" and side["values"] == [2000.0, 2010.0]
    assert side["conditions"] == {"task": "pain", "topics": [0.5, 0.5]} and side["z"] == [0.0, 0.0, 0.0]
    assert side["cbvae_version"] == "0.1.0" and side["run_dir"] == "runs/x"


def test_streamlit_config_binds_localhost_only() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"


# ----- the page -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neuroquery_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NeuroQuery's fixture files with two entries of its synonym map beside them (the page's vocabulary)."""
    folder = tmp_path_factory.mktemp("neuroquery")
    for file in NEUROQUERY_FIXTURE.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / SYNONYMS_FILE).write_text(json.dumps(SYNONYMS))
    return folder


@pytest.fixture(autouse=True)
def _page_environment(monkeypatch: pytest.MonkeyPatch, neuroquery_dir: Path) -> Iterator[None]:
    """Every page reads the fixture vocabulary, and is served on loopback whatever the working directory."""
    from streamlit import config

    monkeypatch.setenv("CBVAE_NEUROQUERY_DIR", str(neuroquery_dir))
    monkeypatch.delenv(ALLOW_REMOTE_ENV, raising=False)
    address = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", address)


def _app(monkeypatch: pytest.MonkeyPatch, run_dir: Path, dataset_dir: Path | None = None, params: dict | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CBVAE_RUN_DIR", str(run_dir))
    if dataset_dir is not None:
        monkeypatch.setenv("CBVAE_DATASET_DIR", str(dataset_dir))
    else:
        monkeypatch.delenv("CBVAE_DATASET_DIR", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=300)
    for key, value in (params or {}).items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(at, kind: str) -> list[str]:
    return [e.value for e in getattr(at, kind)]


#: Elements whose text Streamlit renders as markdown.
MARKDOWN_ELEMENTS = ("markdown", "caption", "warning", "info", "error", "success", "subheader", "title")


def _page_markdown(at) -> list[str]:
    return [e.value for kind in MARKDOWN_ELEMENTS for e in [*getattr(at, kind), *getattr(at.sidebar, kind)]]


def test_app_without_run_shows_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = _app(monkeypatch, tmp_path / "missing")
    assert not at.error
    text = _plain(at.warning[0].value)
    assert "No trained run found" in text and "python -m monai.bundle run training" in text
    assert str(tmp_path / "missing") in text


def test_app_reports_schema_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_run: Path) -> None:
    run = tmp_path / "bad"
    shutil.copytree(app_run, run)
    spec = json.loads((run / "decoder_schema.json").read_text())
    spec["meta_schema"]["continuous_fields"] = spec["meta_schema"]["continuous_fields"][:2]
    (run / "decoder_schema.json").write_text(json.dumps(spec))
    at = _app(monkeypatch, run)
    assert len(at.error) == 1 and "Could not load the run" in at.error[0].value  # RunFolder's one line
    assert "RunFolderError" in at.error[0].value and "differ from" in at.error[0].value


def test_page_refuses_to_serve_on_every_interface(monkeypatch: pytest.MonkeyPatch, app_run: Path) -> None:
    """``streamlit run`` started outside the repository root binds every interface: the page refuses to serve."""
    from streamlit import config

    for address in (None, "0.0.0.0", "::"):
        config.set_option("server.address", address)
        at = _app(monkeypatch, app_run)
        assert [_plain(e.value) for e in at.error] == [_plain(remote_refusal(address, {}))]
        assert not at.image and not at.text_input and not at.warning  # nothing of the run is shown
    monkeypatch.setenv(ALLOW_REMOTE_ENV, "1")  # the operator's explicit opt-in
    at = _app(monkeypatch, app_run)
    assert not at.error and len(at.image) >= 4


SECTIONS = [
    "Ask in words", "Conditions", "Generated map", "Counterfactual difference", "Contrast of two queries", "Evidence",
    "Sweep",
]  # fmt: skip


def test_app_counterfactuals(monkeypatch: pytest.MonkeyPatch, app_run: Path, tiny_dataset: Path) -> None:
    at = _app(monkeypatch, app_run, tiny_dataset)
    assert not at.error, _texts(at, "error")
    assert [h.value.split(":")[0] for h in at.subheader] == SECTIONS
    info = al.load_run_info(app_run)
    caption = _plain(at.caption[0].value)  # which folder and which export the page loaded
    assert str(app_run) in caption and info.export_id in caption and "open only runs you trust" in caption
    generated, glass = at.image[0], at.image[1]
    assert "orthogonal slices on the 2 mm MNI152" in generated.captions[0] and "glass brain" in glass.captions[0]
    assert "Real map of the starting study" in at.image[2].captions[0]
    sweep = next(i for i in at.image if len(i.value) > 1)
    assert sweep.captions == [f"{v:g}" for v in al.sweep_values(info.schema, "year")]
    assert len(set(sweep.value)) >= 2  # the years do not all render the same picture
    assert at.caption[-1].value.startswith("this interaction:")
    spread = next(i for i in at.image if i.captions[0].startswith("Uncertainty (generated)"))
    assert "standard deviation of 16 maps decoded from prior draws" in spread.captions[0]
    top = next(m.value for m in at.markdown if m.value.startswith("**Spread of sampled maps"))
    assert float(top.split("up to ")[1].split("*")[0]) > 0

    # a different task changes the generated map; the difference is scaled to the map and quantified
    categories = info.schema.categories
    at.selectbox(key="task").set_value(categories[0]).run()
    before = at.image[0].value
    at.selectbox(key="task").set_value(categories[-1]).run()
    assert not at.exception and not at.error
    assert at.image[0].value != before
    largest = next(m.value for m in at.markdown if m.value.startswith("**Largest change"))
    assert "% of the generated map's peak" in largest
    assert any(c.value.startswith("What changed (Harvard-Oxford") for c in at.caption)

    # condition strength 0 removes the task, topic and terms contrast: the map equals "... unknown"
    at.radio(key="compare").set_value("task, topics & terms unknown").run()
    at.slider(key="strength").set_value(0.0).run()
    assert "**Largest change: 0**" in next(m.value for m in at.markdown if m.value.startswith("**Largest"))

    # beyond the training range: flagged, still rendered
    at.slider(key="strength").set_value(1.0).run()
    at.checkbox(key="year_unknown").uncheck().run()
    at.slider(key="year_value").set_value(al.slider_spec(info.schema, "year")[1]).run()
    assert any("extrapolation" in w.value for w in at.warning)
    assert "extrapolating" in at.caption[-1].value

    # latent reset returns to the starting point: no difference to it
    at.radio(key="compare").set_value("the starting point").run()
    at.slider(key=keys.latent(int(info.kl_order[0]))).set_value(3.0).run()
    at.button(key="reset_latents").click().run()
    at.button(key="reset_conditions").click().run()
    assert "identical to the reference" in next(m.value for m in at.markdown if m.value.startswith("**Largest"))

    # a prior draw has no real map but renders every view
    at.radio(key="mode").set_value("Prior sample").run()
    assert not at.exception and not at.error
    assert any("prior draw has no real map" in i.value for i in at.info)


def test_ask_in_words(monkeypatch: pytest.MonkeyPatch, app_run: Path, tiny_dataset: Path) -> None:
    info = al.load_run_info(app_run)
    assert info.schema.n_topics == 50  # the run carries Neurosynth's LDA50 keys
    wm = next(t for t, keys in enumerate(info.schema.topic_keys) if keys.split()[:2] == ["memory", "working"])
    at = _app(monkeypatch, app_run, tiny_dataset, {"seed": "1"})  # works without a starting study
    before = at.image[0].value
    at.text_input(key="words").input("working memory").run()
    assert not at.exception and not at.error
    assert at.checkbox(key="topics_known").value and at.slider(key=keys.topic(wm)).value == 1.0
    assert any(c.value == "Recognised: working memory → 1 topic" for c in at.caption)
    assert at.slider(key=keys.topic(wm)) in at.expander[0].slider  # the sliders are folded away
    assert at.image[0].value != before  # the generated map follows the words
    assert at.query_params["q"] == "working memory" and at.query_params["topics"] == f"{wm}:1"

    at.text_input(key="words").input("").run()
    assert any("Type terms" in c.value for c in at.caption)
    at.text_input(key="words").input("xyzzy qwerty").run()
    assert any("Nothing in these words was recognised" in w.value for w in at.warning)
    assert any(_plain(c.value).startswith("Ignored: xyzzy (not in NeuroQuery's vocabulary)") for c in at.caption)
    for text in (
        "<script>alert(1)</script> [x](javascript:y) ![t](https://ev.il/t.png) pain", "痛み " * 500, "a" * 10_000,
    ):  # fmt: skip
        at.text_input(key="words").input(text[: us.MAX_QUERY_CHARS]).run()
        assert not at.exception and not at.error
        assert not [m for source in _page_markdown(at) for m in _markup(source) if "ev.il" in m or "script" in m]


def test_ask_in_words_with_neuroquery_terms(monkeypatch: pytest.MonkeyPatch, app_run: Path) -> None:
    """NeuroQuery's vocabulary: phrases, synonyms and what was ignored are listed; each query gives its own map."""
    at = _app(monkeypatch, app_run, None, {"seed": "1"})
    maps = {}
    for text, recognised in (
        ("nociception", "Recognised: nociception → nociceptive → 1 topic"),
        ("Theory of Mind", "Recognised: Theory of Mind → 1 topic"),
        ("reward anticipation", "Recognised: reward anticipation → 1 topic"),
    ):
        at.text_input(key="words").input(text).run()
        assert not at.exception and not at.error
        assert recognised in [_plain(c.value) for c in at.caption]
        maps[text] = tuple(at.image[0].value)
    assert len(set(maps.values())) == 3  # three queries, three generated maps
    at.text_input(key="words").input("the brain of pain").run()
    assert any(_plain(c.value) == "Ignored: the (stop word), of (stop word)" for c in at.caption)
    # the run reads the terms themselves: a term no topic lists still counts, through the terms condition
    said = "Recognised, no topic lists it (it counts through the terms condition): brain"
    assert said in [_plain(c.value) for c in at.caption] and not at.warning
    at.text_input(key="words").input("").run()
    empty = tuple(at.image[0].value)
    at.text_input(key="words").input("brain").run()
    assert tuple(at.image[0].value) != empty
    # the contrast of two queries: A's map minus B's at the same latents and conditions
    assert not [m for m in at.markdown if m.value.startswith("**Largest")][1:]  # no contrast before two queries
    at.text_input(key="contrast_a").input("pain").run()
    at.text_input(key="contrast_b").input("touch").run()
    assert {"A recognised: pain", "B recognised: touch"} <= {c.value for c in at.caption}
    contrast = [m.value for m in at.markdown if m.value.startswith("**Largest")][1]
    assert float(contrast.split("**Largest change: ")[1].split("**")[0]) > 0  # pain and touch differ
    assert any("red: more than query B" in i.captions[0] for i in at.image)
    at.text_input(key="contrast_b").input("xyzzy").run()
    assert any("A query recognised nothing" in w.value for w in at.warning)
    # without NeuroQuery's files the topics' key words are still read, and the page says so
    monkeypatch.setenv("CBVAE_NEUROQUERY_DIR", str(app_run))
    at = _app(monkeypatch, app_run, None, {"seed": "1", "q": "working memory"})
    assert any(
        _plain(c.value).startswith("NeuroQuery's vocabulary is not available (CBVAE_NEUROQUERY_DIR") for c in at.caption
    )
    assert "Recognised: working memory → 1 topic" in [_plain(c.value) for c in at.caption]


def test_hostile_link_renders_no_markup(monkeypatch: pytest.MonkeyPatch, app_run: Path) -> None:
    """Every URL parameter echoed on the page stays text: no link, image, HTML or formatting."""
    hostile = "`[Log in](https://ev.il/x) ![t](https://ev.il/t.png) <img src=https://ev.il/i> www.ev.il a@ev.il"
    params = {
        "seed": "1", "run": hostile, "task": hostile, "year": hostile, "z": hostile, "topics": hostile,
        "strength": hostile, "sweep": hostile, "study": hostile, "q": hostile, hostile: hostile, "embed": "true",
    }  # fmt: skip
    at = _app(monkeypatch, app_run, None, params)
    notes = [_plain(w.value) for w in at.warning if w.value.startswith("ignored")]
    assert len(notes) == 8 and all("in the link" in n for n in notes)  # every bad parameter, "embed" left out
    assert any(n.startswith(f"ignored task={hostile[:40]}… in the link") for n in notes)  # shown as given
    assert any("this link was made on the run" in _plain(w.value) for w in at.warning)
    found = [m for source in _page_markdown(at) for m in _markup(source) if "ev.il" in m or "img" in m]
    assert found == []


def test_url_state_round_trips_through_the_page(
    monkeypatch: pytest.MonkeyPatch, app_run: Path, tiny_dataset: Path
) -> None:
    info = al.load_run_info(app_run)
    study = info.latents["id"].iloc[3]
    task = info.schema.categories[1]
    params = {
        "run": app_run.name, "study": study, "task": task, "year": "2003", "fwhm": "6.5", "q": "pain",
        "topics": "32:0.7,26:0.3", "strength": "1.5", "sweep": "fwhm", "qa": "pain", "qb": "touch",
    }  # fmt: skip
    at = _app(monkeypatch, app_run, tiny_dataset, params)
    assert not at.warning or all("ignored" not in w.value for w in at.warning)
    assert at.selectbox(key="study").value == study and at.selectbox(key="task").value == task
    assert at.slider(key="year_value").value == 2003 and at.slider(key="fwhm_value").value == 6.5
    assert at.text_input(key="words").value == "pain" and at.slider(key="topic_32").value == 0.7
    assert at.slider(key="strength").value == 1.5 and at.selectbox(key="sweep").value == "fwhm"
    assert (at.text_input(key="contrast_a").value, at.text_input(key="contrast_b").value) == ("pain", "touch")
    out = {k: at.query_params[k] for k in at.query_params}
    for key in ("run", "study", "task", "year", "fwhm", "q", "strength", "sweep", "qa", "qb"):
        assert float(out[key]) == float(params[key]) if key in ("year", "fwhm", "strength") else out[key] == params[key]
    assert out["topics"] == "26:0.3,32:0.7"


@pytest.mark.parametrize("bad", ["inf", "1e400", "-inf", "nan"])
def test_bad_url_values_keep_the_page(monkeypatch: pytest.MonkeyPatch, app_run: Path, bad: str) -> None:
    # ?year=inf / 1e400 used to end the session with an OverflowError and no widgets
    params = {"seed": "2", "year": bad, "task": "no such task", "z": "1,2", "yaer": "2003", "embed": "true"}
    at = _app(monkeypatch, app_run, None, params)
    notes = [_plain(w.value) for w in at.warning if w.value.startswith("ignored")]
    assert len(notes) == 4 and any(f"ignored year={bad} in the link" in n for n in notes)
    assert any(n.startswith("ignored yaer=2003 in the link: not a parameter") for n in notes)
    assert at.checkbox(key="year_unknown").value  # the default: a prior draw's year is unknown
    assert len(at.image) >= 4 and not at.error


def test_evidence_lists_real_studies_of_the_category(
    monkeypatch: pytest.MonkeyPatch, app_run: Path, tiny_dataset: Path
) -> None:
    info = al.load_run_info(app_run)
    at = _app(monkeypatch, app_run, tiny_dataset, {"seed": "0"})
    counts = info.latents["category"].value_counts()
    task = str(counts.index[0])
    at.selectbox(key="task").set_value(task).run()
    at.checkbox(key="topics_known").uncheck().run()
    assert any(c.value == f"Chosen by: studies of the task category {task}, most recent first." for c in at.caption)
    listed = pd.concat([d.value for d in at.dataframe[-2:]])
    assert len(listed) >= 2 and set(listed["category"]) == {task}
    assert set(listed["id"]) <= set(info.latents["id"])  # real studies of the run
    r = next(m.value for m in at.markdown if "Correlation of the generated map" in m.value)
    assert -1.0 <= float(r.split("r = ")[1].split("*")[0]) <= 1.0
    assert any("Mean real map of the" in i.captions[0] for i in at.image)
    study = listed["id"].iloc[0]
    at.selectbox(key="evidence_study").set_value(study).run()
    assert any(i.captions[0] == f"Real map of {study} (data)" for i in at.image)


def test_damaged_dataset_and_model_keep_the_page(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_run: Path, tiny_dataset: Path
) -> None:
    # a damaged optional dataset used to replace the page with a raw pyarrow error
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "metadata.parquet").write_bytes(b"PAR1 damaged")
    at = _app(monkeypatch, app_run, data)
    assert not at.error and any(w.value.startswith("Going on without the dataset:") for w in at.warning)
    assert len(at.image) >= 4
    # a crafted model.pt (a pickle that would run code) used to end the page in an UnpicklingError
    run = tmp_path / "run"
    shutil.copytree(app_run, run)
    (run / "model.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    at = _app(monkeypatch, run, tiny_dataset)
    assert not at.error, _texts(at, "error")
    note = next(_plain(c.value) for c in at.sidebar.caption if "per-study imputation unavailable" in _plain(c.value))
    assert "model.pt" in note and "\n" not in note
    assert len(at.image) >= 4


def test_random_widget_changes_never_break_the_page(
    monkeypatch: pytest.MonkeyPatch, app_run: Path, tiny_dataset: Path
) -> None:
    """A seeded random walk over the widgets: every state renders, without a traceback or an error box."""
    at = _app(monkeypatch, app_run, tiny_dataset)
    rng = np.random.default_rng(0)
    texts = ["", "pain", "<i>faces</i>", "默认 模式", "reward " * 300, "working memory"]
    for step in range(16):
        kind = ["slider", "selectbox", "checkbox", "text_input", "radio"][step % 5]
        # (AppTest cannot set selectboxes that format their options, "study" and "evidence_study")
        widgets = [
            w for w in getattr(at, kind)
            if not getattr(w.proto, "disabled", False) and w.key not in ("study", "evidence_study")
        ]  # fmt: skip
        widget = widgets[int(rng.integers(len(widgets)))]
        if kind == "slider":
            lo, hi = float(widget.min), float(widget.max)
            widget.set_value(type(widget.value)(round(lo + rng.random() * (hi - lo) / widget.step) * widget.step))
        elif kind == "selectbox":
            widget.select_index(int(rng.integers(len(widget.options))))
        elif kind == "radio":  # (an empty "Your study" has no other widgets; uploads are tested above)
            options = [o for o in widget.options if o != "Your study"]
            widget.set_value(options[int(rng.integers(len(options)))])
        elif kind == "checkbox":
            widget.set_value(not widget.value)
        else:
            widget.input(texts[int(rng.integers(len(texts)))])
        at.run()
        assert not at.exception and not at.error, (step, widget.key, _texts(at, "error"))


# ----- your own study ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upload_studies(tiny_dataset: Path, neurosynth_dir: Path) -> dict[str, dict]:
    from cbvae_ext.data import load_dataset_info

    return test_split_studies(load_dataset_info(tiny_dataset).metadata, neurosynth_dir)


def _nearest(at) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "r" in d.value.columns)


def _upload(at, name: str, data: bytes):
    if at.radio(key="mode").value != "Your study":
        at.radio(key="mode").set_value("Your study").run()
        assert any(_plain(i.value).startswith("Upload a study in the sidebar") for i in at.info)
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
    at.run()
    assert not at.exception, at.exception
    return at


def test_your_study_in_each_format(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_run: Path, tiny_dataset: Path, upload_studies: dict
) -> None:
    """A real test study written as Sleuth, CSV (two studies in one file) and NiMARE JSON: its page, each time."""
    monkeypatch.setenv("CBVAE_CACHE_DIR", str(tmp_path / "cache"))
    mni, tal = upload_studies["MNI"], upload_studies["TAL"]
    info = al.load_run_info(app_run)
    files = {
        "study.txt": write_sleuth(tmp_path / "study.txt", [("mine", mni["xyz"])], "MNI"),
        "study.json": write_nimare_json(tmp_path / "study.json", [("mine", mni["xyz"], "MNI")]),
        "two.csv": write_csv(tmp_path / "two.csv", [("mine", mni["xyz"], "MNI"), ("other", tal["xyz"], "TAL")]),
    }
    at = _app(monkeypatch, app_run, tiny_dataset)
    for name, path in files.items():
        _upload(at, name, path.read_bytes())
        assert not at.error, _texts(at, "error")
        assert "Your study" in [h.value for h in at.subheader]
        assert any(
            _plain(m.value).startswith("Typicality: the model finds this map more likely than") for m in at.markdown
        )
        near = _nearest(at)
        assert near["id"].iloc[0] == mni["id"] and near["r"].iloc[0] == pytest.approx(1.0, abs=1e-3)  # itself
        captions = [i.captions[0] for i in at.image]
        assert captions[2].startswith("Your study's MA map (data") and captions[3].startswith("Reconstruction")
        assert any(c.startswith("Uncertainty (generated)") for c in captions)
        assert any("your study mine" in _plain(c.value) for c in at.caption)
        assert any("Download your study's maps" in e.proto.label for e in at.get("download_button"))
    # the CSV's two studies: a select box, and the second one is a different starting point
    assert at.selectbox(key="upload_study").options == ["mine", "other"]
    top = int(info.kl_order[0])
    first = at.slider(key=keys.latent(top)).value
    at.selectbox(key="upload_study").set_value(1).run()
    assert not at.exception and not at.error
    assert _nearest(at)["id"].iloc[0] == tal["id"]
    assert at.slider(key=keys.latent(top)).value != first

    # its posterior is the fixed latent code: the counterfactual controls edit it
    at.radio(key="compare").set_value("the starting point").run()
    assert "identical to the reference" in next(m.value for m in at.markdown if m.value.startswith("**Largest"))
    before = at.image[0].value
    at.selectbox(key="task").set_value(info.schema.categories[-1]).run()
    assert not at.error and at.image[0].value != before
    assert "identical" not in next(m.value for m in at.markdown if m.value.startswith("**Largest"))


BAD_UPLOADS = {
    "unknown space": (
        "colin.txt",
        b"// Reference=Colin27\n// s\n// Subjects=10\n10 20 30\n",
        "unknown coordinate space",
    ),
    "mixed spaces": ("mixed.csv", b"x,y,z,space\n10,20,30,MNI\n-10,20,30,TAL\n", "mixes spaces"),
    "empty": ("empty.csv", b"", "empty"),
    "unreadable": ("broken.json", b"{not json", "broken.json"),
}


def test_bad_upload_shows_the_study_packages_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_run: Path, tiny_dataset: Path
) -> None:
    from cbvae_ext.study import StudyContext, StudyError, analyse_file

    monkeypatch.setenv("CBVAE_CACHE_DIR", str(tmp_path / "cache"))
    context = StudyContext.open(app_run, tiny_dataset, cache=False)
    at = _app(monkeypatch, app_run, tiny_dataset)
    for name, data, words in BAD_UPLOADS.values():
        with pytest.raises(StudyError) as err:
            analyse_file(data, filename=name, context=context)
        _upload(at, name, data)
        assert [e.value for e in at.error] == [md_escape(al.one_line(err.value, 300))]
        assert words in _plain(at.error[0].value) and "\n" not in at.error[0].value
        assert _plain(at.error[0].value).startswith(name)  # the upload's name, not a temporary copy's path
        assert not at.image  # nothing of another study is shown
    hostile = b"x,y,z,space\n1,2,3,`[a](https://ev.il)`\n"
    _upload(at, "h.csv", hostile)
    assert "ev.il" in _plain(at.error[0].value) and "](https" not in at.error[0].value.replace(WORD_JOINER, "")
