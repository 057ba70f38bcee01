"""The Great Expectations suite over the catalogue manifest, and how its results map to rows.

Each row-level expectation carries a ``reason`` in its ``meta``; the rows it finds unexpected
(``result_format="COMPLETE"`` gives their index, which is the manifest row number) are
quarantined with that reason. Table-level expectations (row count, required columns) describe
the whole manifest and are reported in the results but quarantine no row.

Great Expectations is imported inside the functions: importing it takes about 4 s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.catalog.config import ValidationConfig

if TYPE_CHECKING:
    import pandas as pd

SUITE_NAME = "catalogue_manifest"
# A price as a catalogue writes it: digits with an optional sign, decimals and exponent.
NUMBER_PATTERN = r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$"
PRICE_VALUE = "price_value"


@dataclass
class SuiteOutcome:
    """What the suite found.

    Attributes:
        success: Whether every expectation held.
        row_reasons: Manifest row number -> ``(reason, detail)`` pairs.
        failed_table_expectations: Table-level expectations that did not hold.
        result: The validation result as JSON-ready data.
        data_docs: The data docs ``index.html``, when they were built.
    """

    success: bool
    row_reasons: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    failed_table_expectations: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    data_docs: Path | None = None


def manifest_frame(rows: dict[int, dict[str, str]], columns: list[str]) -> pd.DataFrame:
    """The manifest as the suite sees it: text columns with empty cells as nulls, indexed by
    row number, plus ``price_value``, the price parsed as a number where it is one."""
    import pandas as pd

    frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns, dtype=object)
    frame = frame.where(frame.ne(""), None)
    if "price" in frame.columns:
        frame[PRICE_VALUE] = pd.to_numeric(frame["price"], errors="coerce")
    return frame


def build_suite(config: ValidationConfig, columns: list[str]):  # -> gx.ExpectationSuite
    """The expectation suite for a manifest with these columns."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    def row_rule(expectation: Any, reason: str, detail: str) -> Any:
        expectation.meta = {"reason": reason, "detail": detail}
        return expectation

    present = set(columns)
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    expectations: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    expectations += [gxe.ExpectColumnToExist(column=name) for name in config.required_columns]
    for name in ("product_id", "image_path", "category", "title", "price"):
        if name in present:
            expectations.append(
                row_rule(
                    gxe.ExpectColumnValuesToNotBeNull(column=name),
                    f"missing_{name}",
                    f"{name} is empty",
                )
            )
    if "product_id" in present:
        expectations.append(
            row_rule(
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column="product_id", min_value=1, max_value=config.max_product_id_length
                ),
                "product_id_too_long",
                f"product_id is longer than {config.max_product_id_length} characters",
            )
        )
    if "image_path" in present:
        expectations.append(
            row_rule(
                gxe.ExpectColumnValuesToBeUnique(column="image_path"),
                "duplicate_image_path",
                "another row has the same image_path",
            )
        )
    if "title" in present:
        expectations.append(
            row_rule(
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column="title", min_value=1, max_value=config.max_title_length
                ),
                "title_too_long",
                f"title is longer than {config.max_title_length} characters",
            )
        )
    if "category" in present and config.categories:
        expectations.append(
            row_rule(
                gxe.ExpectColumnValuesToBeInSet(
                    column="category", value_set=list(config.categories)
                ),
                "unknown_category",
                f"category is not one of {', '.join(config.categories)}",
            )
        )
    if "price" in present:
        expectations.append(
            row_rule(
                gxe.ExpectColumnValuesToMatchRegex(column="price", regex=NUMBER_PATTERN),
                "price_not_a_number",
                "price is not a number",
            )
        )
        expectations.append(
            row_rule(
                gxe.ExpectColumnValuesToBeBetween(
                    column=PRICE_VALUE, min_value=0, max_value=config.max_price
                ),
                "price_out_of_range",
                f"price is below 0 or above {config.max_price:g}",
            )
        )
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def run_suite(
    frame: pd.DataFrame, config: ValidationConfig, data_docs_dir: Path | None = None
) -> SuiteOutcome:
    """Validate the manifest frame with the suite in an in-memory (ephemeral) GX context.

    Args:
        frame: From :func:`manifest_frame`.
        config: Thresholds of the suite.
        data_docs_dir: Where to render the GX data docs (HTML); None renders none.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if data_docs_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(data_docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites=sites,
        ),
    )
    batch = (
        context.data_sources.add_pandas("catalogue")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("nightly")
    )
    suite = context.suites.add(build_suite(config, [str(c) for c in frame.columns]))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite)
    )
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if sites else []
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="nightly_manifest",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE"},
        )
    )
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = checkpoint_result.run_results.values()
    outcome = SuiteOutcome(success=bool(validation.success))
    outcome.result = json.loads(json.dumps(validation.to_json_dict(), default=str))
    for result in validation.results:
        if result.success:
            continue
        meta = result.expectation_config.meta or {}
        if "reason" not in meta:
            outcome.failed_table_expectations.append(
                f"{result.expectation_config.type} {result.expectation_config.kwargs}"
            )
            continue
        for index in result.result.get("unexpected_index_list") or []:
            outcome.row_reasons.setdefault(int(index), []).append((meta["reason"], meta["detail"]))
    if sites:
        outcome.data_docs = Path(data_docs_dir).resolve() / "index.html"
    return outcome
