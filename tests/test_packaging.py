"""Packaging like a library: the extras fail in one line naming the extra, the packages list is complete,
``pip install`` outside the checkout trains and generates from the installed configs, and the commands that
need no network never import torch before they must."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import tomllib
from conftest import BUNDLE_ENV, NEUROQUERY_DIR, REPO_ROOT, TINY_TERM_DIMS, TINY_TRAINING

from cbvae_ext.configs import config_dir
from cbvae_ext.extras import EXTRAS, MissingExtraError

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _hidden(*modules: str) -> str:
    """Python source that makes ``modules`` unimportable, as if their extra were not installed."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


def test_every_optional_package_is_an_extra_and_none_is_core():
    extras = PYPROJECT["project"]["optional-dependencies"]
    core = " ".join(PYPROJECT["project"]["dependencies"])
    for package, extra in EXTRAS.values():
        assert any(req.startswith(package) for req in extras[extra]), (package, extra)
        assert package not in core
    assert extras["all"] == ["cbvae[app,cloud,tracking]"]


def test_the_packages_list_holds_every_package_and_the_configs():
    from setuptools import find_packages

    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == {*find_packages(str(REPO_ROOT), include=["cbvae_ext*"]), "cbvae_ext.bundle_configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"cbvae_ext.bundle_configs": "bundle/configs"}
    # in the checkout, the one lookup finds the source of the package data
    assert config_dir() == REPO_ROOT / "bundle" / "configs"


@pytest.mark.parametrize(
    ("switch", "hidden", "package"),
    [("use_mlflow", ("mlflow",), "mlflow"), ("use_wandb", ("wandb",), "wandb"), ("use_tensorboard", (), "tensorboard")],
)
def test_a_tracker_that_is_not_installed_is_one_line(switch, hidden, package, monkeypatch):
    from cbvae_ext.engine.tracking import check_trackers

    for name in hidden or ("tensorboard",):
        monkeypatch.setitem(sys.modules, name, None)
    if not hidden:  # torch.utils.tensorboard is imported already: make it import (and fail) again
        for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
            monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingExtraError) as err:
        check_trackers(**{switch: True})
    assert str(err.value) == (
        f'--{switch} true needs {package}, which is not installed: pip install "cbvae[tracking]" '
        f"(or pass --{switch} false)"
    )
    check_trackers(**{switch: False})  # off: nothing is imported


def test_runpod_not_installed_is_one_line(monkeypatch):
    from cbvae_ext.cloud import launcher, pod_deadline

    monkeypatch.setitem(sys.modules, "runpod", None)
    with pytest.raises(MissingExtraError, match=r'^launching a pod needs runpod, .*: pip install "cbvae\[cloud\]"$'):
        launcher._sdk("key")
    env = {pod_deadline.POD_ID_VAR: "pod1", pod_deadline.POD_KEY_VAR: "key"}
    with pytest.raises(MissingExtraError, match=r'^removing the pod needs runpod, .*"cbvae\[cloud\]"$'):
        pod_deadline.remove_this_pod(environ=env, say=lambda _: None)


def test_the_page_without_streamlit_is_one_line():
    code = _hidden("streamlit") + f"import runpy\nrunpy.run_path({str(REPO_ROOT / 'app' / 'streamlit_app.py')!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=BUNDLE_ENV)
    assert proc.returncode == 1
    assert proc.stderr == (
        'error: the Counterfactual Machine page needs streamlit, which is not installed: pip install "cbvae[app]"\n'
    )


def test_light_paths_never_import_torch_or_monai(tiny_dataset: Path, neurosynth_dir: Path, tmp_path: Path):
    """The builder finding its cached build, the study command refusing a bad file and the term maps refusing
    no terms each spent 10-16 s importing torch and MONAI (eager package ``__init__``s); now about a second."""
    data = shutil.copytree(tiny_dataset, tmp_path / "tiny")  # a copy: its lock never meets another test's builder
    bad = tmp_path / "bad.txt"
    bad.write_text("// Reference=Colin27\n// a\n// Subjects=3\n1 2 3\n")
    code = f"""
import sys
import cbvae_ext.evaluation as evaluation
from cbvae_ext.data import build_dataset
from cbvae_ext.evaluation.term_maps import main as term_maps
from cbvae_ext.study.__main__ import main as study
# the session dataset's build options: the same cache key, so the build is reused
build_dataset(neurosynth_dir={str(neurosynth_dir)!r}, out={str(data)!r}, subset=120, resolution=4,
              neuroquery_dir={str(NEUROQUERY_DIR)!r}, term_dims={TINY_TERM_DIMS})
assert term_maps(["--run_dir", "r", "--dataset_dir", "d", "--out", "o.png", "--terms", " , "]) == 2
assert study([{str(bad)!r}, "--run_dir", "r", "--out", {str(tmp_path / "never")!r}]) == 2
heavy = sorted(m for m in ("torch", "monai", "nimare") if m in sys.modules)
assert heavy == [], heavy
assert "paired_bootstrap" in dir(evaluation) and callable(evaluation.paired_bootstrap)  # names still resolve
try:
    evaluation.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("an unknown name resolved")
"""
    # a rebuild would import NiMARE (its template), so the check below also says the build was reused
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=BUNDLE_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no terms given" in proc.stderr and "unknown coordinate space 'Colin27'" in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("package", ["cbvae_ext.data", "cbvae_ext.evaluation", "cbvae_ext.study"])
def test_every_lazily_exported_name_resolves(package: str):
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:  # a misspelt name or submodule in the lazy table raises here
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))


@pytest.mark.slow
def test_pip_install_outside_the_checkout_trains_and_generates(tmp_path: Path, tiny_dataset: Path):
    """``pip install`` from a copy of the repository into a folder, then train and generate from another folder
    with the installed configs (``--no-deps``: the dependencies are this environment's; no network)."""
    src, site, cwd = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "cbvae_ext", src / "cbvae_ext", ignore=ignore)
    shutil.copytree(REPO_ROOT / "bundle" / "configs", src / "bundle" / "configs", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)  # nothing may come from the copy
    cwd.mkdir()
    env = {**BUNDLE_ENV, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    configs = Path(run("-m", "cbvae_ext.configs").stdout.strip())
    assert configs == site / "cbvae_ext" / "bundle_configs"
    assert {"train.yaml", "evaluate.yaml", "inference.yaml", "metadata.json", "logging.conf"} <= {
        p.name for p in configs.iterdir()
    }
    train = ["-m", "monai.bundle", "run", "training", "--config_file", str(configs / "train.yaml")]
    run(*train, "--dataset_dir", str(tiny_dataset), "--output_dir", "run", "--epochs", "1", *TINY_TRAINING,
        "--use_wandb", "false", "--use_mlflow", "false")  # fmt: skip
    assert (cwd / "run" / "model.pt").is_file() and (cwd / "run" / "decoder.ts").is_file()
    # the inference workflow imports cbvae_ext.inference from the installed package
    infer = ["-m", "monai.bundle", "run", "inference", "--config_file", str(configs / "inference.yaml")]
    out = run(*infer, "--run_dir", "run", "--conditions", "{'year': 2010}", "--output_file", "gen.nii.gz")
    assert "wrote gen.nii.gz" in out.stdout
    assert nib.load(cwd / "gen.nii.gz").header["descrip"].tobytes().startswith(b"GENERATED")
