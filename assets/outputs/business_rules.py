"""Business rules on the model's recommendations: what may reach customers, and why not.

Every recommendation ends up in exactly one of two tables: `outputs.recommendations` (passed
every rule) or `outputs.rejected_recommendations` (with the list of rules it broke). The rules
run as one SQL statement over the whole table, so they cost seconds even at 20M rows.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import Field

from assets.common.current_state import Built, as_of_day, StateBuild, StateConfig, current_state_asset, knob
from assets.common.metadata import table_preview
from assets.common.partitions import daily_partitions
from assets.validate.gx_checks import run_suite_check
from assets.validate.rules import load_suite
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar

STAGE = "validated_recommendations"
ACCEPTED_TABLE = "outputs.recommendations"
REJECTED_TABLE = "outputs.rejected_recommendations"
INPUTS = ("recommendations", "dim_products", "stg_purchases")

# One SQL expression a rule; a recommendation is rejected with the names of every rule it breaks.
RULES_SQL = """
WITH recs AS (
    SELECT r.*, p.in_stock
    FROM ml.recommendations AS r
    LEFT JOIN analytics.dim_products AS p ON p.product_id = r.product_id
),
checked AS (
    SELECT
        recs.*,
        list_filter([
            CASE WHEN recs.in_stock IS NULL THEN 'unknown_product' END,
            CASE WHEN NOT recs.in_stock THEN 'out_of_stock' END,
            CASE WHEN recs.confidence IS NULL OR isnan(recs.confidence) OR recs.confidence < $min_confidence
                 THEN 'confidence_below_threshold' END,
            CASE WHEN EXISTS (
                    SELECT 1 FROM analytics.stg_purchases AS b
                    WHERE b.customer_id = recs.customer_id AND b.product_id = recs.product_id)
                 THEN 'already_bought' END,
            CASE WHEN recs.predicted_value IS NULL OR isnan(recs.predicted_value)
                      OR recs.predicted_value < $min_value OR recs.predicted_value > $max_value
                 THEN 'predicted_value_out_of_range' END
        ], lambda rule: rule IS NOT NULL) AS failed_rules
    FROM recs
)
SELECT * EXCLUDE (in_stock) FROM checked
"""


class OutputRulesConfig(StateConfig):
    min_confidence: float = Field(default=0.01, description="Recommendations below this confidence are rejected.")
    min_predicted_value: float = Field(default=0.0, description="Lowest sane predicted value (currency).")
    max_predicted_value: float = Field(default=10_000.0, description="Highest sane predicted value (currency).")
    max_rejection_rate: float = knob(0.2, "Above this share rejected, the check warns.")


def apply_rules(con, config: OutputRulesConfig) -> dict[str, int]:
    """Split ml.recommendations into accepted and rejected tables; returns counts by rule."""
    params = {
        "min_confidence": config.min_confidence,
        "min_value": config.min_predicted_value,
        "max_value": config.max_predicted_value,
    }
    con.execute("CREATE SCHEMA IF NOT EXISTS outputs")
    con.execute(f"CREATE OR REPLACE TEMP TABLE checked_recommendations AS {RULES_SQL}", params)
    con.execute(
        f"CREATE OR REPLACE TABLE {ACCEPTED_TABLE} AS "
        "SELECT * EXCLUDE (failed_rules) FROM checked_recommendations WHERE len(failed_rules) = 0"
    )
    con.execute(
        f"CREATE OR REPLACE TABLE {REJECTED_TABLE} AS "
        "SELECT *, now()::TIMESTAMP AS rejected_at FROM checked_recommendations WHERE len(failed_rules) > 0"
    )
    counts = dict(
        fetch_all(
            con,
            f"SELECT rule, count(*) FROM (SELECT unnest(failed_rules) AS rule FROM {REJECTED_TABLE}) GROUP BY rule",
        )
    )
    counts["input"] = fetch_scalar(con, "SELECT count(*) FROM checked_recommendations")
    counts["accepted"] = fetch_scalar(con, f"SELECT count(*) FROM {ACCEPTED_TABLE}")
    counts["rejected"] = fetch_scalar(con, f"SELECT count(*) FROM {REJECTED_TABLE}")
    con.execute("DROP TABLE checked_recommendations")
    return counts


def rule_verdicts(counts: Mapping[str, Any], config: OutputRulesConfig) -> list[dg.AssetCheckResult]:
    total, accepted, rejected = counts["input"], counts["accepted"], counts["rejected"]
    rate = rejected / total if total else 0.0
    return [
        dg.AssetCheckResult(
            check_name="rejection_rate",
            passed=rate <= config.max_rejection_rate,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"rejection_rate": round(rate, 4), "threshold": config.max_rejection_rate},
            description=f"{rejected:,} of {total:,} recommendations rejected by the business rules "
                        f"({rate:.1%}; at most {config.max_rejection_rate:.0%})",
        ),
        dg.AssetCheckResult(
            check_name="every_recommendation_accounted_for",
            passed=accepted + rejected == total,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"input": total, "accepted": accepted, "rejected": rejected},
            description=f"{accepted:,} accepted + {rejected:,} rejected of {total:,} recommendations"
                        + ("" if accepted + rejected == total else f": {total - accepted - rejected:,} unaccounted"),
        ),
    ]


@current_state_asset(
    name=STAGE,
    inputs=INPUTS,
    tables=[ACCEPTED_TABLE, REJECTED_TABLE],
    group="outputs",
    config_class=OutputRulesConfig,
    kinds={"duckdb"},
    checks=[
        dg.AssetCheckSpec("rejection_rate", asset=STAGE,
                          description="The business rules reject at most max_rejection_rate of the recommendations."),
        dg.AssetCheckSpec("every_recommendation_accounted_for", asset=STAGE, blocking=True,
                          description="Every recommendation is either accepted or rejected with its reasons."),
    ],
    verdicts=rule_verdicts,
    personal_data=True,  # customer ids
)
def validated_recommendations(build: StateBuild) -> Built:
    """Recommendations that pass the business rules; the rest kept with the rules they broke."""
    with build.warehouse.transaction() as con:
        counts = apply_rules(con, build.config)
        build.record(con, counts["accepted"], counts)
        suspicious = fetch_scalar(
            con, f"SELECT count(*) FROM {REJECTED_TABLE} WHERE list_contains(failed_rules, 'predicted_value_out_of_range')"
        )
        preview = table_preview(con, f"SELECT customer_id, product_id, failed_rules FROM {REJECTED_TABLE}")
    if suspicious:
        build.log.warning(f"{suspicious:,} recommendations had a suspicious predicted value (outside the sane range)")
    total, rejected = counts["input"], counts["rejected"]
    rate = rejected / total if total else 0.0
    by_rule = {k: v for k, v in counts.items() if k not in ("input", "accepted", "rejected")}
    build.log.info(f"{counts['accepted']:,} accepted, {rejected:,} rejected of {total:,} ({rate:.1%}); {by_rule}")
    return Built({
        "dagster/row_count": counts["accepted"],
        "input_recommendations": total,
        "accepted": counts["accepted"],
        "rejected": rejected,
        "rejection_rate": round(rate, 4),
        "rejected_by_rule": dg.MetadataValue.json(by_rule),
        "rejected_preview": preview,
    })


class OutputSuiteConfig(dg.Config):
    chunk_rows: int = Field(default=1_000_000, description="Rows per pandas batch handed to GX.")
    max_rows: int = Field(default=2_000_000, description="Above this, validate a repeatable sample of this many rows.")


@dg.asset_check(
    asset=validated_recommendations,
    name="output_expectation_suite",
    description="The GX suite expectations/recommendations.json on outputs.recommendations.",
    partitions_def=daily_partitions,
    blocking=False,
)
def output_expectation_suite(
    context: dg.AssetCheckExecutionContext, config: OutputSuiteConfig, warehouse: DuckDBWarehouse
) -> dg.AssetCheckResult:
    # The outputs table is current state, built as of the run's (last) day.
    return run_suite_check(warehouse, load_suite("recommendations"), ACCEPTED_TABLE, as_of_day(context).isoformat(),
                           "validated_recommendations", config.chunk_rows, config.max_rows, partitioned=False)


