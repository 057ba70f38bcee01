"""The nightly Vitrine DAG (Airflow 3 TaskFlow): orchestration only.

    changed ─► validate ─► train ─► evaluate ─► gate ─┬─► index ─► rollout ─► smoke ─┬─► finish
    (short-circuit: nothing changed → the night ends)  └─► rejected ─────────────────┘

Every task calls one step function of ``components/nightly.py`` (the same ones
``vitrine nightly`` and ``vitrine demo`` run), which writes its result under the run's own
folder, ``<nightly.work_dir>/runs/<Airflow run id>/``, and returns it at once when it is
already there: a retried or cleared task is idempotent. ``train`` runs in this worker (mode
``local``) or as a Kubeflow pipeline on ``nightly.kfp_host`` (mode ``kfp``), which then also
evaluates. A refused gate takes the ``rejected`` branch: nothing is indexed or rolled out, so
the previous model and collection keep serving, and the reasons are in ``finish``.

Configuration: the run's ``params_file`` (default ``$VITRINE_PARAMS`` or the repository's
``params.yaml``) with dotted overrides in ``set`` (as ``dvc exp run -S``); relative paths in it
are relative to ``$VITRINE_PROJECT_DIR`` (default: the repository). Trigger a night with other
values: ``airflow dags trigger vitrine_nightly --conf '{"set": {"train.epochs": 2}}'``.
Schedule: ``$VITRINE_NIGHTLY_SCHEDULE`` (cron, default 02:00 UTC). Heavy imports (torch,
Milvus, Great Expectations) happen inside the tasks, so parsing this file stays cheap.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from airflow.sdk import Param, dag, task

PROJECT_DIR = Path(os.environ.get("VITRINE_PROJECT_DIR", Path(__file__).resolve().parents[1]))
SCHEDULE = os.environ.get("VITRINE_NIGHTLY_SCHEDULE", "0 2 * * *")
# Infrastructure steps (training, Milvus, the service) retry with exponential back-off.
RETRY_DELAY_S = float(os.environ.get("VITRINE_NIGHTLY_RETRY_DELAY_S", "60"))
INFRA_RETRIES = {
    "retries": int(os.environ.get("VITRINE_NIGHTLY_RETRIES", "2")),
    "retry_delay": dt.timedelta(seconds=RETRY_DELAY_S),
    "retry_exponential_backoff": 2.0,  # a multiplier in Airflow 3.3 (True would mean 1)
    "max_retry_delay": dt.timedelta(minutes=30),
}


def _night(params: dict[str, Any] | None, run_id: str | None):
    """This DAG run's plan and run folder."""
    from components.nightly import load_plan, run_dir_for

    assert params is not None and run_id is not None  # Airflow passes both
    os.chdir(PROJECT_DIR)  # relative paths in params.yaml are the project's
    plan = load_plan(params["params_file"], params["set"])
    return plan, run_dir_for(plan, run_id)


def _step(name: str, params: dict[str, Any] | None, run_id: str | None) -> dict[str, Any]:
    """Run one step of the night for this DAG run.

    Bad input (a malformed catalogue, an unknown option, a model the gate cannot read) fails
    the task at once with the message; anything else is left to the task's retries.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from components.nightly import STEP_FUNCTIONS

    try:
        plan, run_dir = _night(params, run_id)
        return STEP_FUNCTIONS[name](plan, run_dir, False)
    except (ValueError, FileNotFoundError) as err:
        raise AirflowFailException(f"{name}: {err}") from err


@dag(
    dag_id="vitrine_nightly",
    description="Validate the catalogue, fine-tune, gate, index and roll out the search service",
    schedule=SCHEDULE,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["vitrine"],
    default_args={"owner": "vitrine"},
    params={
        "params_file": Param(
            os.environ.get("VITRINE_PARAMS", "params.yaml"),
            type="string",
            description="parameters file, relative to the project folder",
        ),
        "set": Param(
            {},
            type="object",
            description='dotted overrides, as dvc exp run -S: {"train.epochs": 2}',
        ),
    },
)
def vitrine_nightly() -> None:
    @task.short_circuit
    def changed(params: dict[str, Any] | None = None, run_id: str | None = None) -> bool:
        """End the night here when neither the catalogue nor the parameters changed."""
        result = _step("changed", params, run_id)
        print(result["reason"])
        return bool(result["changed"])

    @task
    def validate(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        result = _step("validate", params, run_id)
        return {k: result[k] for k in ("valid_rows", "quarantined_rows", "quarantined_by_reason")}

    @task(**INFRA_RETRIES)
    def train(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        return _step("train", params, run_id)["package"]

    @task
    def evaluate(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        result = _step("evaluate", params, run_id)
        return {k: v["recall@1"] for k, v in result.items() if isinstance(v, dict)}

    @task.branch
    def gate(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        decision = _step("gate", params, run_id)
        for reason in decision["reasons"]:
            print(f"gate: {reason}")
        return "index" if decision["promote"] else "rejected"

    @task(**INFRA_RETRIES)
    def index(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        return _step("index", params, run_id)["collection"]

    @task(**INFRA_RETRIES)
    def rollout(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        return _step("rollout", params, run_id)

    @task(**INFRA_RETRIES)
    def smoke(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        return _step("smoke", params, run_id)

    @task
    def rejected(params: dict[str, Any] | None = None, run_id: str | None = None) -> list[str]:
        """The gate refused the candidate: say why; the old model and collection serve on."""
        from components.nightly import step_result

        decision = step_result(_night(params, run_id)[1], "gate") or {}
        print(f"night rejected; production stays {decision.get('serving')}")
        for reason in decision.get("reasons", []):
            print(f"  {reason}")
        return decision.get("reasons", [])

    @task(trigger_rule="none_failed_min_one_success")
    def finish(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        outcome = _step("finish", params, run_id)
        print(f"night {outcome['outcome']}: {'; '.join(outcome.get('reasons', []))}")
        return outcome

    decision, promoted, refused, done = gate(), index(), rejected(), finish()
    changed() >> validate() >> train() >> evaluate() >> decision >> [promoted, refused]
    promoted >> rollout() >> smoke() >> done
    refused >> done


vitrine_nightly()
