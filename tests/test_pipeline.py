"""The Kubeflow pipeline: what it asks of the cluster, and whole local runs with kfp.local.

The local runs train a tiny timm model for one epoch on a 16-product demo catalogue; every
registry, Milvus folder and work folder lives under the test's temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import yaml

from components.nightly import load_plan, parse_overrides, step_evaluate, step_train
from components.pipeline import (
    PipelineSettings,
    compile_pipeline,
    nightly_pipeline,
    plan_from_json,
    plan_params_json,
    plan_settings,
    submit_run,
    train_evaluate_on_kfp,
)
from components.pipeline_cli import add_pipeline_parser, describe_exports
from components.registry import ModelRegistry
from tests.conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"


def vitrine_pipeline(*argv: str) -> int:
    """``vitrine pipeline ARGV`` through the sub-command's own parser."""
    parser = argparse.ArgumentParser(prog="vitrine")
    add_pipeline_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pipeline", *argv])
    return args.handler(args)


def tiny_params(root: Path) -> Path:
    """A params.yaml for a ~1 s training run, with everything under ``root``."""
    params = {
        "train": dict(TINY_TRAIN),
        "validate": {"data_docs": False},
        "gate": {"floors": {"inshop.recall@1": 0.0}},
        "nightly": {
            "work_dir": str(root / "nights"),
            "registry": str(root / "registry"),
            "demo_products": 16,
        },
        "index": {"uri": str(root / "milvus")},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def compiled(tmp_path: Path, pipeline: Any) -> list[dict[str, Any]]:
    out = compile_pipeline(pipeline, tmp_path / "pipeline.yaml")
    return list(yaml.safe_load_all(out.read_text()))


# ---- compiling ---------------------------------------------------------------------------


def test_train_task_asks_for_a_gpu_node_and_every_task_uses_the_image(tmp_path: Path) -> None:
    settings = PipelineSettings.from_dict(
        {
            "base_image": "registry.example/vitrine:9.9",
            "accelerator_type": "nvidia.com/gpu",
            "accelerator_limit": 2,
            "cpu_request": 6,
            "memory_request": "24Gi",
            "tolerations": [
                {"key": "gpu-pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}
            ],
            "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
        }
    )
    spec, platform = compiled(tmp_path, nightly_pipeline(load_plan(), settings))
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{n}" for n in ("validate", "train", "evaluate")} | {
        f"exec-{n}" for n in ("gate", "index", "reject")
    }
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/vitrine:9.9"}
    resources = executors["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    assert resources["resourceCpuRequest"] == "6"
    assert resources["resourceMemoryRequest"] == "24Gi"
    assert "resources" not in executors["exec-evaluate"]["container"]  # only train asks

    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(kubernetes) == {"exec-train"}
    assert kubernetes["exec-train"]["tolerations"] == [
        {"key": "gpu-pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}
    ]
    assert kubernetes["exec-train"]["nodeSelector"]["labels"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100"
    }

    # The gate decides between index (promote) and reject (else); nothing is cached.
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    conditions = {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in branches.values()}
    assert conditions == {
        "promote": "inputs.parameter_values['pipelinechannel--gate-promote'] == true",
        "refused": "!(inputs.parameter_values['pipelinechannel--gate-promote'] == true)",
    }
    assert "index" in spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert "reject" in spec["components"]["comp-condition-3"]["dag"]["tasks"]
    tasks = spec["root"]["dag"]["tasks"]
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {
        "catalogue", "params_json", "registry", "milvus_uri", "run_id", "export_dir"
    }  # fmt: skip


def test_compile_command_reads_the_pipeline_section_and_no_gpu_drops_the_accelerator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nightly.yaml"
    vitrine_pipeline("compile", "--out", str(out), "--params", str(REPO / "params.yaml"))
    spec, platform = yaml.safe_load_all(out.read_text())
    defaults = PipelineSettings()
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == defaults.base_image
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert "1 x nvidia.com/gpu" in capsys.readouterr().out

    vitrine_pipeline(
        "compile", "--out", str(out), "--no-gpu", "-S", "pipeline.base_image=example/v:1",
        "-S", "pipeline.cpu_request=2", "--pipeline", "train-evaluate",
    )  # fmt: skip
    (spec,) = yaml.safe_load_all(out.read_text())  # no Kubernetes platform document at all
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert spec["pipelineInfo"]["name"] == "vitrine-train-evaluate"
    assert train["image"] == "example/v:1"
    assert "accelerator" not in train["resources"]
    assert train["resources"]["resourceCpuRequest"] == "2"


def test_settings_and_overrides_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown pipeline option"):
        PipelineSettings.from_dict({"gpus": 1})
    with pytest.raises(ValueError, match="tolerations entries"):
        PipelineSettings.from_dict({"tolerations": [{"taint": "x"}]})
    with pytest.raises(ValueError, match="shared_volume"):
        PipelineSettings.from_dict({"shared_volume": {"pvc": "runs"}})
    with pytest.raises(ValueError, match=r"SECTION\.KEY=VALUE"):
        parse_overrides(["epochs=2"])
    assert parse_overrides(["gate.floors.inshop.recall@1=1.1"]) == {
        "gate.floors.inshop.recall@1": 1.1
    }
    with pytest.raises(ValueError, match="needs --local"):
        vitrine_pipeline("run")
    with pytest.raises(ValueError, match="needs --host"):
        vitrine_pipeline("submit", "--params", str(REPO / "params.yaml"))
    with pytest.raises(ValueError, match="needs --catalogue"):
        vitrine_pipeline("submit", "--host", UNREACHABLE, "-S", "nightly.catalogue=null")


def test_params_travel_as_json_and_parse_like_load_plan() -> None:
    plan = load_plan(REPO / "params.yaml", {"train.epochs": 3, "gate.floors.sop.recall@1": 0.4})
    again = plan_from_json(plan_params_json(plan), {"index.uri": "http://milvus:19530"})
    assert again.train == plan.train
    assert again.gate == plan.gate
    assert again.evaluate == plan.evaluate
    assert again.validate == plan.validate
    assert again.index.uri == "http://milvus:19530"
    assert plan_settings(plan) == PipelineSettings()  # no pipeline section in the plan
    with_section = dataclasses.replace(plan, raw=plan.raw | {"pipeline": {"accelerator_limit": 4}})
    assert plan_settings(with_section).accelerator_limit == 4


# ---- talking to a cluster ----------------------------------------------------------------


def test_unreachable_host_says_which_host_and_what_to_check(tmp_path: Path) -> None:
    plan = load_plan(None, {"nightly.mode": "kfp", "nightly.kfp_host": UNREACHABLE})
    validated = tmp_path / "validated.csv"
    validated.write_text("product_id\n")
    with pytest.raises(RuntimeError) as caught:
        train_evaluate_on_kfp(plan, tmp_path / "run", str(validated))
    message = str(caught.value)
    assert f"cannot reach the Kubeflow Pipelines API at {UNREACHABLE}" in message
    assert "nightly.kfp_host" in message and "port-forward" in message
    with pytest.raises(RuntimeError, match="cannot reach the Kubeflow Pipelines API"):
        vitrine_pipeline("submit", "--host", UNREACHABLE, "--catalogue", str(validated))


class FakeClient:
    """kfp.Client's run calls, recorded; the run ends in ``state``."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    state: ClassVar[str] = "SUCCEEDED"
    create_error: ClassVar[Exception | None] = None

    def __init__(self, **kwargs: Any) -> None:
        self.calls.append(("client", kwargs))

    def create_run_from_pipeline_package(self, package: str, **kwargs: Any) -> Any:
        if self.create_error:
            raise self.create_error
        self.calls.append(("create", {"package": package, **kwargs}))
        return SimpleNamespace(run_id="run-123")

    def wait_for_run_completion(self, run_id: str, timeout: float) -> Any:
        self.calls.append(("wait", {"run_id": run_id, "timeout": timeout}))
        return SimpleNamespace(state=self.state, error=SimpleNamespace(message="OOMKilled"))


def test_submit_checks_the_run_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kfp
    import kfp_server_api

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(FakeClient, "calls", [])
    with socket.create_server(("127.0.0.1", 0)) as server:  # passes the pre-flight connect
        host = f"http://127.0.0.1:{server.getsockname()[1]}"
        settings = PipelineSettings(experiment="nights", namespace="vitrine")
        package = tmp_path / "p.yaml"
        outcome = submit_run(host, package, {"a": 1}, settings, run_name="n1", timeout_s=60)
        assert outcome["state"] == "SUCCEEDED" and outcome["run_id"] == "run-123"
        assert outcome["url"] == f"{host}/#/runs/details/run-123"
        kinds = dict(FakeClient.calls)
        assert kinds["client"] == {"host": host, "namespace": "vitrine"}
        assert kinds["create"]["experiment_name"] == "nights"
        assert kinds["create"]["enable_caching"] is False
        assert kinds["wait"] == {"run_id": "run-123", "timeout": 60}

        monkeypatch.setattr(FakeClient, "state", "FAILED")
        with pytest.raises(RuntimeError, match=r"run-123 .* ended FAILED: OOMKilled"):
            submit_run(host, package, {}, settings, run_name="n2")
        refused = kfp_server_api.ApiException(status=403, reason="Forbidden")
        monkeypatch.setattr(FakeClient, "create_error", refused)
        with pytest.raises(RuntimeError, match="creating the run failed with HTTP 403"):
            submit_run(host, package, {}, settings, run_name="n3")


# ---- whole local runs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def promoted_night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One whole pipeline run with kfp.local, through ``vitrine pipeline run --local``."""
    root = tmp_path_factory.mktemp("kfp_night")
    params = tiny_params(root)
    out = root / "first"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = vitrine_pipeline(
            "run", "--local", "--params", str(params), "--run-id", "night-1", "--out", str(out)
        )
    return {"root": root, "params": params, "out": out, "code": code, "printed": printed.getvalue()}


def test_local_run_promotes_and_indexes(promoted_night: dict[str, Any]) -> None:
    from serving.store import VectorStore

    root, out = promoted_night["root"], promoted_night["out"]
    assert promoted_night["code"] == 0
    export = out / "export"
    decision = json.loads((export / "gate.json").read_text())
    assert decision["promote"] is True
    registry = ModelRegistry(root / "registry")
    assert registry.production_version() == decision["candidate"]
    assert registry.record(decision["candidate"])["run_id"] == "night-1"
    indexed = json.loads((export / "index.json").read_text())
    assert indexed["model_version"] == decision["candidate"]
    store = VectorStore(str(root / "milvus"), alias=indexed["alias"])
    try:
        assert store.alias_target() == indexed["collection"]
        assert store.count(indexed["collection"]) == indexed["rows"] > 0
    finally:
        store.close()
    tasks = sorted(p.name for p in next((out / "root").iterdir()).iterdir())
    assert tasks == ["evaluate", "gate", "index", "train", "validate"]
    printed = promoted_night["printed"]
    assert "gate      promoted" in printed and f"index     alias {indexed['alias']}" in printed
    metrics = json.loads((export / "evaluation.json").read_text())
    assert 0.0 <= metrics["inshop"]["recall@1"] <= 1.0


@pytest.mark.slow  # a second whole pipeline run: ~30 s on 2 cores
def test_local_run_refused_by_the_gate_indexes_nothing(promoted_night: dict[str, Any]) -> None:
    root = promoted_night["root"]
    registry = ModelRegistry(root / "registry")
    production = registry.production_version()
    out = root / "second"
    vitrine_pipeline(
        "run", "--local", "--params", str(promoted_night["params"]), "--run-id", "night-2",
        "--out", str(out), "-S", "gate.floors.inshop.recall@1=1.1", "-S", "train.seed=1",
    )  # fmt: skip
    decision = json.loads((out / "export" / "gate.json").read_text())
    assert decision["promote"] is False
    assert any("below the floor 1.1000" in reason for reason in decision["reasons"])
    tasks = sorted(p.name for p in next((out / "root").iterdir()).iterdir())
    assert tasks == ["evaluate", "gate", "reject", "train", "validate"]
    assert not (out / "export" / "index.json").exists()
    assert registry.production_version() == production
    assert registry.history()[-1]["event"] == "rejected"
    assert "index     skipped" in "\n".join(describe_exports(out / "export"))


@pytest.mark.slow  # train-evaluate on kfp.local: ~10 s on 2 cores
def test_nightly_mode_kfp_on_host_local(promoted_night: dict[str, Any], tmp_path: Path) -> None:
    """The nightly train step submits train-evaluate (here to kfp.local) and reads it back."""
    validated = promoted_night["out"] / "export" / "validate" / "validated.csv"
    plan = load_plan(promoted_night["params"], {"nightly.mode": "kfp", "nightly.kfp_host": "local"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "validate.json").write_text(json.dumps({"validated": str(validated)}))
    trained = step_train(plan, run_dir, progress=False)
    package = Path(trained["package"])
    assert package == (run_dir / "kfp" / "package").resolve()
    assert (package / "config.json").is_file() and (package / "model.safetensors").is_file()
    assert trained["kfp"]["host"] == "local"
    evaluation = step_evaluate(plan, run_dir, progress=False)
    assert set(evaluation) >= {"inshop", "sop", "model_version"}
    exported = json.loads((run_dir / "kfp" / "evaluation.json").read_text())
    assert evaluation["inshop"] == exported["inshop"] and evaluation["sop"] == exported["sop"]
