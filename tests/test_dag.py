"""The nightly Airflow DAG, run for real with `airflow dags test` on SQLite (offline): a night
that promotes (the live service then serves the new collection) and a night the gate refuses
(the old model and collection still serve; the reason is recorded); and its DagBag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from components.demo import search_service
from components.registry import ModelRegistry
from tests.live_server import free_port
from tests.test_nightly import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "vitrine_nightly"
TOKEN = "dag-test-token"
# `airflow` itself, with CPython's final garbage collection of Airflow's large heap skipped
# (about 2 s per process).
AIRFLOW = [
    sys.executable,
    "-c",
    "import atexit, gc, sys; atexit.register(gc.freeze); "
    "from airflow.__main__ import main; sys.exit(main())",
]


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An Airflow home with a migrated SQLite database, for this module's runs."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = os.environ | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "VITRINE_NIGHTLY_RETRY_DELAY_S": "1",
        "VITRINE_ADMIN_TOKEN": TOKEN,
    }
    migrate = subprocess.run([*AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    return env


def _dags_test(env: dict[str, str], overrides: dict, succeed: bool = True) -> str:
    conf = json.dumps({"set": overrides})
    run = subprocess.run(
        [*AIRFLOW, "dags", "test", DAG_ID, "--conf", conf],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert (run.returncode == 0) == succeed, run.stdout[-6000:]
    return run.stdout


def _last_run_dir(work: Path) -> Path:
    runs = sorted((work / "nights" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return runs[-1]


def test_the_dag_bag_has_no_import_errors(airflow_env: dict[str, str]) -> None:
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag; "
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r}); dag = bag.get_dag({DAG_ID!r}); "
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, "
        "'tasks': sorted(dag.task_ids), 'catchup': dag.catchup, "
        "'max_active_runs': dag.max_active_runs, 'schedule': str(dag.schedule), "
        "'retries': {t.task_id: t.retries for t in dag.tasks}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=airflow_env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bag = json.loads(result.stdout.strip().splitlines()[-1])
    assert bag["errors"] == {}
    steps = "changed validate train evaluate gate index rollout smoke rejected finish"
    assert bag["tasks"] == sorted(steps.split())
    assert bag["catchup"] is False and bag["max_active_runs"] == 1
    assert bag["schedule"] == "0 2 * * *"
    assert all(bag["retries"][t] == 2 for t in ("train", "index", "rollout", "smoke"))


def test_a_promoted_night_then_a_refused_one(airflow_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = tiny_overrides(tmp_path) | {"nightly.service_url": url}
    env = airflow_env | {"VITRINE_UPLOAD_DIR": str(tmp_path / "uploads")}
    with search_service(str(tmp_path / "milvus"), "127.0.0.1", port, tmp_path / "svc.log", env):
        log = _dags_test(airflow_env, overrides)
        assert "night promoted" in log
        night = _last_run_dir(tmp_path)
        finish = json.loads((night / "finish.json").read_text())
        smoke = json.loads((night / "smoke.json").read_text())
        assert finish["outcome"] == "promoted" and smoke["rank"] == 1
        served = httpx.get(f"{url}/v1/info").json()
        assert served["collection"] == finish["collection"]
        production = ModelRegistry(tmp_path / "registry").production_version()
        assert production == finish["candidate"]

        refused = overrides | {"gate.floors": {"inshop.recall@1": 1.01}, "train.seed": 1}
        log = _dags_test(airflow_env, refused)
        assert "night rejected; production stays " + production in log
        night = _last_run_dir(tmp_path)
        finish = json.loads((night / "finish.json").read_text())
        assert finish["outcome"] == "rejected"
        assert finish["reasons"][0].endswith("is below the floor 1.0100")
        assert not (night / "index.json").exists() and not (night / "rollout.json").exists()
        assert httpx.get(f"{url}/v1/info").json()["collection"] == served["collection"]
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert ModelRegistry(tmp_path / "registry").production_version() == production


def test_bad_input_fails_the_night_at_once_with_the_reason(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-catalogue" / "manifest.csv"
    overrides = tiny_overrides(tmp_path) | {"nightly.catalogue": str(missing)}
    log = _dags_test(airflow_env, overrides, succeed=False)
    # Bad input is not retried: one try, and the message names the step and the file.
    assert "AirflowFailException: changed:" in log, log[-4000:]
    assert str(missing) in log
    assert not (tmp_path / "nights" / "last_night.json").exists()
