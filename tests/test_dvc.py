"""The DVC pipeline (dvc.yaml): `dvc repro`, an experiment, metrics and plots, run in a
throwaway git repository with a tiny model and a small demo catalogue."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_TRAIN

pytestmark = pytest.mark.slow  # 35 s on 2 idle cores: five stages, then three of them again

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: vitrine and dvc
STAGES = ("catalog", "validate", "train", "evaluate", "index")


def _run(*args: str, cwd: Path) -> str:
    """Run a command in the test repository; its stdout and stderr, or a failure with both."""
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{output[-4000:]}")
    return output


def _code_deps(dvc_yaml: dict) -> set[str]:
    """The dependencies of every stage that are files of this repository (code, not data)."""
    deps = {dep for stage in dvc_yaml["stages"].values() for dep in stage.get("deps", [])}
    return {dep for dep in deps if "${" not in dep and (REPO / dep).exists()}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository holding dvc.yaml, params.yaml (tiny model) and the code the
    stages depend on, after one `dvc repro`, committed."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if not (BIN / "dvc").exists() or not (BIN / "vitrine").exists():
        pytest.skip(f"dvc and vitrine must be installed beside {sys.executable}")
    root = tmp_path_factory.mktemp("dvc_repo")
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["vars"][0]["data"]["demo"] |= {"products": 16, "photos": 4}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"] |= TINY_TRAIN
    params["validate"]["data_docs"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    (root / ".gitignore").write_text("/artifacts/\n__pycache__/\n")
    for dep in _code_deps(pipeline):
        source, target = REPO / dep, root / dep
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy(source, target)

    _run("git", "init", "-q", "-b", "main", cwd=root)
    _run("git", "config", "user.name", "Vitrine test", cwd=root)
    _run("git", "config", "user.email", "test@vitrine.invalid", cwd=root)
    _run("dvc", "init", "-q", cwd=root)
    _run("dvc", "config", "core.check_update", "false", cwd=root)  # offline: no update daemon
    _run("git", "add", "-A", cwd=root)
    _run("git", "commit", "-q", "-m", "pipeline", cwd=root)

    output = _run("dvc", "repro", cwd=root)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in output
    _run("git", "add", "-A", cwd=root)  # dvc.lock and eval/, as a user commits a run
    _run("git", "commit", "-q", "-m", "baseline run", cwd=root)
    return root


def test_repro_writes_metrics_plots_and_index(dvc_repo: Path):
    metrics = json.loads((dvc_repo / "eval" / "metrics.json").read_text())
    for protocol in ("inshop", "sop"):
        assert 0.0 <= metrics[protocol]["recall@1"] <= metrics[protocol]["recall@10"] <= 1.0
        curve = dvc_repo / "eval" / "recall" / f"recall_{protocol}.csv"
        rows = list(csv.DictReader(curve.open()))
        assert [int(row["k"]) for row in rows][:2] == [1, 10]
    loss = list(csv.DictReader((dvc_repo / "artifacts/dvc/model/loss.csv").open()))
    assert [row["epoch"] for row in loss] == ["1"]
    index = json.loads((dvc_repo / "artifacts/dvc/index.json").read_text())
    assert index["verification"]["passed"] and index["uri"] == "artifacts/dvc/milvus"
    assert "up to date" in _run("dvc", "status", cwd=dvc_repo)
    assert _run("git", "status", "--porcelain", cwd=dvc_repo).strip() == ""  # eval/ is committed


def test_metrics_and_plots_show(dvc_repo: Path):
    shown = json.loads(_run("dvc", "metrics", "show", "--json", cwd=dvc_repo))
    (workspace,) = shown.values()  # keyed "" (the workspace) by dvc 3
    values = workspace["data"]["eval/metrics.json"]["data"]
    assert values["inshop"]["recall@1"] == pytest.approx(
        json.loads((dvc_repo / "eval/metrics.json").read_text())["inshop"]["recall@1"]
    )
    plots = json.loads(_run("dvc", "plots", "show", "--json", cwd=dvc_repo))
    assert not plots.get("errors")
    assert set(plots["data"]) == {"recall@K", "training loss"}
    recall_points = plots["data"]["recall@K"][0]["content"]["data"]["values"]
    assert {point["filename"] for point in recall_points} == {
        "recall_inshop.csv",
        "recall_sop.csv",
    }


def test_experiment_reruns_only_what_train_params_change(dvc_repo: Path):
    output = _run(
        "dvc", "exp", "run", "--name", "triplet", "-S", "train.loss=triplet", cwd=dvc_repo
    )
    for stage in ("catalog", "validate"):
        assert f"Stage '{stage}' didn't change, skipping" in output
    for stage in ("train", "evaluate", "index"):
        assert f"Running stage '{stage}'" in output

    table = _run("dvc", "exp", "show", "--csv", cwd=dvc_repo)
    rows = {row["Experiment"] or row["rev"]: row for row in csv.DictReader(io.StringIO(table))}
    assert rows["main"]["train.loss"] == "eir"
    assert rows["triplet"]["train.loss"] == "triplet"
    for name in ("main", "triplet"):
        for column in ("inshop.recall@1", "sop.recall@1"):
            assert 0.0 <= float(rows[name][column]) <= 1.0

    diff = json.loads(_run("dvc", "plots", "diff", "--json", "main", "triplet", cwd=dvc_repo))
    assert not diff.get("errors")
    for plot in ("recall@K", "training loss"):
        assert diff["data"][plot][0]["revisions"] == ["main", "triplet"]
