"""One night end to end in-process against a real search service: a promoted night rolls the
service onto the new pair, an unchanged night is skipped, a refused gate leaves the old pair
serving and says why; and the In-Shop view of a catalogue."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from components.demo import search_service
from components.nightly import last_night, load_plan, run_night, set_dotted, step_result
from components.registry import ModelRegistry
from model.datasets.protocols import as_protocol
from model.datasets.records import ImageRecord, RetrievalDataset
from tests.conftest import TINY_TRAIN
from tests.live_server import free_port

TOKEN = "night-test-token"


def tiny_overrides(work: Path) -> dict:
    """A night of a few seconds: a 16-product catalogue and a 0.1 M-parameter model."""
    return {
        "nightly.work_dir": str(work / "nights"),
        "nightly.registry": str(work / "registry"),
        "nightly.demo_products": 16,
        "index.uri": str(work / "milvus"),
        **{f"train.{key}": value for key, value in TINY_TRAIN.items()},
        "gate.floors": {"inshop.recall@1": 0.0, "sop.recall@1": 0.0},
        "validate.data_docs": False,
    }


def test_promote_skip_and_reject_against_a_live_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VITRINE_ADMIN_TOKEN", TOKEN)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = tiny_overrides(tmp_path) | {"nightly.service_url": url}
    env = os.environ | {"VITRINE_UPLOAD_DIR": str(tmp_path / "uploads")}
    with search_service(str(tmp_path / "milvus"), "127.0.0.1", port, tmp_path / "log", env):
        assert httpx.get(f"{url}/readyz").status_code == 503  # nothing indexed yet

        first = run_night(load_plan("params.yaml", overrides), "night-1", progress=False)
        assert first["finish"]["outcome"] == "promoted"
        assert first["smoke"]["rank"] == 1
        served = httpx.get(f"{url}/v1/info").json()
        assert served["collection"] == first["index"]["collection"]
        assert first["gate"]["reasons"] == ["every check passed (judged against the floors alone)"]
        registry = ModelRegistry(tmp_path / "registry")
        assert registry.production_version() == first["gate"]["candidate"]

        again = run_night(load_plan("params.yaml", overrides), "night-2", progress=False)
        assert again["changed"]["changed"] is False
        assert again["finish"]["outcome"] == "skipped"
        assert "nothing changed since night night-1" in again["changed"]["reason"]
        assert set(again) == {"run_dir", "changed", "finish"}

        refused = run_night(
            load_plan(
                "params.yaml",
                overrides | {"gate.floors": {"inshop.recall@1": 1.01}, "train.seed": 1},
            ),
            "night-3",
            progress=False,
        )
        assert refused["finish"]["outcome"] == "rejected"
        assert refused["finish"]["reasons"][0] == (
            f"inshop.recall@1 {refused['evaluate']['inshop']['recall@1']:.4f} is below the "
            "floor 1.0100"
        )
        assert "index" not in refused and "rollout" not in refused
        assert httpx.get(f"{url}/v1/info").json()["collection"] == served["collection"]
        assert registry.production_version() == first["gate"]["candidate"]
        assert registry.history()[-1]["event"] == "rejected"
        assert last_night(load_plan("params.yaml", overrides))["outcome"] == "rejected"


def test_a_rerun_of_a_night_reuses_finished_steps(tmp_path: Path) -> None:
    plan = load_plan("params.yaml", tiny_overrides(tmp_path))
    first = run_night(plan, "night-1", progress=False)
    run_dir = Path(first["run_dir"])
    trained = json.loads((run_dir / "train.json").read_text())
    (run_dir / "finish.json").unlink()  # as if the night died before its last task
    second = run_night(plan, "night-1", progress=False)
    assert second["train"] == trained  # not trained again
    assert step_result(run_dir, "finish")["outcome"] == "promoted"
    assert first["rollout"]["skipped"] and "no nightly.service_url" in first["rollout"]["reason"]


def test_overrides_and_config_errors(tmp_path: Path) -> None:
    raw: dict = {}
    set_dotted(raw, "gate.floors.inshop.recall@1", 0.5)
    set_dotted(raw, "train.loss.name", "eet")
    assert raw == {"gate": {"floors": {"inshop.recall@1": 0.5}}, "train": {"loss": {"name": "eet"}}}
    with pytest.raises(ValueError, match="unknown nightly option"):
        load_plan(None, {"nightly.catalog": "x.csv"})
    with pytest.raises(ValueError, match="kfp_host"):
        load_plan(None, {"nightly.mode": "kfp"})
    with pytest.raises(ValueError, match="unknown training option"):
        load_plan(None, {"train.epoch": 3})


def test_a_catalogue_under_the_inshop_protocol() -> None:
    def record(product: str, shot: int, label: int) -> ImageRecord:
        return ImageRecord(Path(f"/c/{product}/{shot}.jpg"), label, product)

    test = [record("b", 1, 1), record("a", 2, 0), record("a", 1, 0), record("c", 1, 2)]
    sop = RetrievalDataset("catalog", Path("/c"), {"train": [], "test": test}, "sop")
    inshop = as_protocol(sop, "inshop")
    assert [str(r.path) for r in inshop.query] == ["/c/a/1.jpg"]
    assert sorted(str(r.path) for r in inshop.gallery) == ["/c/a/2.jpg", "/c/b/1.jpg", "/c/c/1.jpg"]
    back = as_protocol(inshop, "sop")
    assert sorted(map(str, (r.path for r in back.query))) == sorted(str(r.path) for r in test)
    assert as_protocol(sop, "sop") is sop
