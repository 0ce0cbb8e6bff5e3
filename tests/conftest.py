"""Shared fixtures: real Neurosynth data, a tiny dataset and tiny trained runs made by the real bundle CLI.

Neurosynth files come from ``CBVAE_NEUROSYNTH_DIR`` when set, else ``../shared/data/neurosynth`` when it
exists (CI), else the committed fixture ``tests/data/neurosynth`` (a few hundred real studies, same file
names). Tests marked ``full_data`` need all 14,371 studies and skip on the fixture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import preload
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Committed Neurosynth-layout fixture (regenerate with scripts/make_neurosynth_fixture.py).
FIXTURE_NEUROSYNTH = REPO_ROOT / "tests" / "data" / "neurosynth"
_SHARED_NEUROSYNTH = REPO_ROOT.parent / "shared" / "data" / "neurosynth"
_COORDINATES = "data-neurosynth_version-7_coordinates.tsv.gz"


def _neurosynth_dir() -> Path:
    if os.environ.get("CBVAE_NEUROSYNTH_DIR"):
        return Path(os.environ["CBVAE_NEUROSYNTH_DIR"])
    return _SHARED_NEUROSYNTH if (_SHARED_NEUROSYNTH / _COORDINATES).is_file() else FIXTURE_NEUROSYNTH


def full_data_available() -> bool:
    """Whether the Neurosynth files in use are the full database (not the committed fixture)."""
    return _neurosynth_dir().resolve() != FIXTURE_NEUROSYNTH.resolve()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if full_data_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs the full Neurosynth v7 database; set CBVAE_NEUROSYNTH_DIR (using the fixture {FIXTURE_NEUROSYNTH})"
    )
    for item in items:
        if "full_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_reaches_python() -> None:
    """Tests press Ctrl-C (SIGINT), in process and in launched CLIs: a suite started in the background by a
    non-interactive shell inherits SIGINT ignored, so give Python its handler back (children then get the default)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def foreign_savefig_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process-wide ``savefig`` settings ``import nimare.reports`` makes (bbox "tight", dpi 100).

    Which test module imports it first depends on how xdist shares the tests out, so a figure's pixel size
    must not depend on them.
    """
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "savefig.bbox", "tight")
    monkeypatch.setitem(matplotlib.rcParams, "savefig.dpi", 100)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def neurosynth_dir() -> Path:
    """Real Neurosynth v7 files: CBVAE_NEUROSYNTH_DIR, else ../shared/data/neurosynth, else the fixture."""
    path = _neurosynth_dir()
    if not (path / _COORDINATES).is_file():
        pytest.fail(f"Neurosynth v7 files not found in {path}; set CBVAE_NEUROSYNTH_DIR to a copy")
    return path


#: NeuroQuery's term counts: ../shared/data/neuroquery when it is there, else the committed fixture's rows.
_SHARED_NEUROQUERY = REPO_ROOT.parent / "shared" / "data" / "neuroquery"
NEUROQUERY_DIR = (
    _SHARED_NEUROQUERY
    if (_SHARED_NEUROQUERY / "data-neuroquery_version-1_metadata.tsv.gz").is_file()
    else Path(__file__).parent / "data" / "neuroquery"
)


@pytest.fixture(scope="session")
def neuroquery_dir() -> Path:
    """NeuroQuery's files the session dataset's terms.npz comes from (pass it on as CBVAE_NEUROQUERY_DIR)."""
    return NEUROQUERY_DIR


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(folder)`` once per test run; its JSON result is returned to every caller.

    Under pytest-xdist (``scripts/test.sh`` runs the suite on every core) each worker is its own session:
    the first one to get here builds in a folder all workers share, under a file lock, and the others read
    its result; without xdist it is a plain session fixture.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # one folder per run, above the workers' own
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            folder = shared / name
            folder.mkdir()
            done.write_text(json.dumps(make(folder)))
        return json.loads(done.read_text())


#: Entries of the tiny dataset's text embedding (its 62 training studies with text; 64 would give 61).
TINY_TERM_DIMS = 8


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, neurosynth_dir: Path) -> Path:
    """A 120-study stratified subset at 4 mm with NeuroQuery's terms and their embedding (the terms condition),
    built once per run by the real builder."""

    def make(folder: Path) -> str:
        from cbvae_ext.data import build_dataset

        return str(
            build_dataset(
                neurosynth_dir=neurosynth_dir,
                out=folder / "tiny",
                subset=120,
                resolution=4,
                neuroquery_dir=NEUROQUERY_DIR,
                term_dims=TINY_TERM_DIMS,  # off by default; on here, so the terms condition is tested end to end
            )
        )

    return Path(once_per_run(tmp_path_factory, "data", make))


#: Tiny network and 2 iterations per epoch: tests of the training plumbing, not of the model.
TINY_TRAINING = [
    "--epoch_length", "2",
    "--val_epoch_length", "1",
    "--batch_size", "4",
    "--network_overrides", "{'channels': [4, 8], 'block_layers': [1], 'growth_rate': 4}",
    "--progress", "false",
]  # fmt: skip

#: Environment of a bundle subprocess: offline W&B, no inherited tracking targets.
BUNDLE_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI")},
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "PYTHONUNBUFFERED": "1",
    # OpenMP threads that spin while waiting steal the cores of the other processes a test starts
    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
}


def training_command(
    dataset_dir: Path, output_dir: Path, epochs: int, *extra: str, configs: tuple[str, ...] = ("train.yaml",)
) -> list[str]:
    """Arguments of `python -m monai.bundle run training` with the tiny settings (without the interpreter)."""
    files = [f"bundle/configs/{c}" for c in configs]
    config_arg = files[0] if len(files) == 1 else str(files)
    return [
        "-m", "monai.bundle", "run", "training",
        "--config_file", config_arg,
        "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir),
        "--epochs", str(epochs),
        *TINY_TRAINING, *extra,
    ]  # fmt: skip


#: This test process's preloaded Python (tests/preload.py), started on first use.
_PRELOAD = preload.PreloadServer(BUNDLE_ENV, REPO_ROOT)


@pytest.fixture(scope="session", autouse=True)
def _stop_the_preload_server():
    yield
    _PRELOAD.close()


def run_python(
    args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``python *args`` with its output captured as text, through the preloaded Python where it can serve ``env``
    (it spares each command MONAI's import; ``CBVAE_TEST_PRELOAD=0``: a fresh interpreter every time)."""
    return preload.run(_PRELOAD, args, BUNDLE_ENV if env is None else env, cwd, timeout)


def start_python(args: list[str], log: Any) -> preload.Child | subprocess.Popen:
    """``python *args`` in the background, stdout and stderr into the open file ``log`` (as ``run_python``)."""
    if _PRELOAD.serves(BUNDLE_ENV):
        return _PRELOAD.popen(args, BUNDLE_ENV, REPO_ROOT, log.fileno(), log.fileno())
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=BUNDLE_ENV, stdout=log, stderr=subprocess.STDOUT
    )


def run_bundle(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run a bundle command from the repo root; fail with the end of its output when it fails."""
    if launcher is None:
        proc = run_python(args)
    else:
        proc = subprocess.run(
            [*launcher, *args], cwd=REPO_ROOT, env=BUNDLE_ENV, capture_output=True, text=True, timeout=900
        )
    if proc.returncode != 0:
        pytest.fail(f"bundle command failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Path]:
    """One C-β-VAE and one baseline run, each trained for one epoch on the tiny dataset (once per run)."""

    def make(root: Path) -> dict[str, str]:
        off = ("--use_wandb", "false", "--use_mlflow", "false")
        commands = [
            training_command(tiny_dataset, root / "cbvae", 1, *off),
            training_command(tiny_dataset, root / "baseline", 1, *off, configs=("train.yaml", "train_baseline.yaml")),
        ]
        with ThreadPoolExecutor(max_workers=2) as pool:  # both at once: the other test process often waits on them
            list(pool.map(run_bundle, commands))
        return {"cbvae": str(root / "cbvae"), "baseline": str(root / "baseline")}

    return {name: Path(path) for name, path in once_per_run(tmp_path_factory, "runs", make).items()}
