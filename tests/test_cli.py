"""The ``vitrine`` command line: help, evaluate, train, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.cli import build_parser, main
from tests.conftest import TINY_BACKBONE

COMMANDS = ["evaluate", "train"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_explains_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: vitrine" in text
    if command:
        assert "--dataset" in text and "--root" in text and "--json" in text


def test_serve_help_lists_every_setting_with_its_default(capsys):
    from serving.settings import Settings

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"VITRINE_{name.upper()} (" in text, name
    assert "VITRINE_DEFAULT_TOP_K (12): products per answer" in text


def test_every_subcommand_is_documented():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        assert sub.description, f"`vitrine {name}` has no description"


def test_evaluate_writes_metrics_json(tiny_sop, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(
        [
            "evaluate",
            "--dataset",
            "sop",
            "--root",
            str(tiny_sop),
            "--backbone",
            TINY_BACKBONE,
            "--weights",
            "none",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    assert {"recall@1", "recall@10", "map@r", "num_queries"} <= set(metrics)
    assert "recall@100" not in metrics  # larger than the 30-image test set
    assert metrics["num_queries"] == 30 and metrics["protocol"] == "sop"
    assert "recall@1" in capsys.readouterr().out


def test_train_then_evaluate_the_package(tiny_sop, tmp_path):
    package, train_json, eval_json = tmp_path / "pkg", tmp_path / "t.json", tmp_path / "e.json"
    code = main(
        [
            "train",
            "--dataset",
            "sop",
            "--root",
            str(tiny_sop),
            "--loss",
            "eet",
            "--backbone",
            TINY_BACKBONE,
            "--weights",
            "none",
            "--epochs",
            "1",
            "--classes-per-batch",
            "4",
            "--images-per-class",
            "4",
            "--train-image-size",
            "64",
            "--embed-dim",
            "16",
            "--out",
            str(package),
            "--json",
            str(train_json),
            "--quiet",
        ]
    )
    assert code == 0
    trained = json.loads(train_json.read_text())
    assert trained["loss"] == "eet" and "recall@1" in trained
    assert json.loads((package / "metrics.json").read_text()) == trained
    code = main(
        [
            "evaluate",
            "--dataset",
            "sop",
            "--root",
            str(tiny_sop),
            "--package",
            str(package),
            "--json",
            str(eval_json),
            "--quiet",
        ]
    )
    assert code == 0
    assert json.loads(eval_json.read_text())["recall@1"] == pytest.approx(trained["recall@1"])


def test_params_file_and_flags_merge(tmp_path):
    from components.cli import train_config_from_args

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 3\n  lr: 0.01\n  loss:\n    name: eet\n    margin: 0.2\n")
    args = build_parser().parse_args(
        ["train", "--dataset", "sop", "--root", ".", "--params", str(params), "--lr", "0.5"]
    )
    config = train_config_from_args(args)
    assert (config.epochs, config.lr, config.loss.name, config.loss.margin) == (3, 0.5, "eet", 0.2)
    args = build_parser().parse_args(
        [
            "train",
            "--dataset",
            "sop",
            "--root",
            ".",
            "--loss-param",
            "equidistant_weight=0.1",
            "--loss-param",
            "mining=hard",
        ]
    )
    config = train_config_from_args(args)
    assert (config.loss.equidistant_weight, config.loss.mining) == (0.1, "hard")
    args = build_parser().parse_args(
        ["train", "--dataset", "sop", "--root", ".", "--loss-param", "no_such_option=1"]
    )
    with pytest.raises(ValueError, match="unknown loss option"):
        train_config_from_args(args)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "components.cli", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )


def test_missing_dataset_is_a_clear_error_without_traceback(tmp_path):
    result = _run_cli("evaluate", "--dataset", "inshop", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "list_eval_partition.txt" in result.stderr and "Traceback" not in result.stderr


def test_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 1\n")
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    result = _run_cli("evaluate", "--dataset", "sop", "--root", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Ebay_train.txt line 2" in result.stderr


def test_repository_params_yaml_is_valid():
    from model.config import TrainConfig, load_params

    root = Path(__file__).resolve().parents[1]
    config = TrainConfig.from_dict(load_params(root / "params.yaml", "train"))
    assert config.loss.name in {"triplet", "contrastive", "eet", "eir"}
    from components.catalog.config import ValidationConfig

    validation = ValidationConfig.from_dict(load_params(root / "params.yaml", "validate"))
    assert validation == ValidationConfig()  # params.yaml spells out the defaults


def test_help_does_not_import_torch():
    """`vitrine --help` stays instant: building the parser imports no torch or timm."""
    code = (
        "import sys\nfrom components.cli import build_parser\nbuild_parser()\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert result.stdout.strip() == "[]", result.stderr
