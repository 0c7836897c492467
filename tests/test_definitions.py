"""The code location loads the way `dagster dev` and `dagster definitions validate` load it."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_validate():
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_daily_pipeline_job_covers_every_asset():
    from definitions import defs

    job = defs.resolve_job_def("daily_pipeline")
    asset_keys = {key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys}
    job_keys = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert asset_keys and asset_keys <= job_keys


def test_a_run_launches_its_warehouse_writers_one_at_a_time_and_its_other_steps_beside_them():
    from definitions import STEP_EXECUTOR_CONFIG as config
    from definitions import defs
    from resources.warehouse import WAREHOUSE_POOL, WAREHOUSE_STEP_TAGS

    assert config["max_concurrent"] == 2
    assert config["tag_concurrency_limits"] == [{"key": "warehouse_pool", "value": WAREHOUSE_POOL, "limit": 1}]
    nodes = defs.resolve_job_def("daily_pipeline").graph.node_defs
    # every writer carries the tag the executor counts (a writer without it would poll the pool)
    assert all(WAREHOUSE_STEP_TAGS.items() <= node.tags.items() for node in nodes if node.pool == WAREHOUSE_POOL)
    assert all(node.pool == WAREHOUSE_POOL for node in nodes if WAREHOUSE_STEP_TAGS.items() <= node.tags.items())
    # the GX suites validate holding no connection: they take no slot; a landed batch's suites
    # share a step (one GX import): raw_customers' two tables
    suites = [node for node in nodes if "_expectation_suite" in node.name]
    assert len(suites) >= 4 and all(node.pool is None for node in suites)
    assert {"raw_customers_expectation_suites", "validated_recommendations_output_expectation_suite"} <= {
        node.name for node in suites}
    # and they start after the steps that build the day when both are ready
    assert all(int(node.tags.get("dagster/priority", 0)) < 0 for node in suites)
    # dim_products (all that product_embeddings, a step beside the writers, waits for) before the
    # other writers: sql/schema.yml's run_first
    assert all(int(node.tags.get("dagster/priority", 0)) == (node.name == "dim_products")
               for node in nodes if node not in suites)


def test_every_asset_is_catalogued_with_owner_domain_table_code_and_described_checks():
    from definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node, name = graph.get(key), key.to_user_string()
        assert node.owners and node.tags.get("domain"), name
        assert node.metadata.get("dagster/table_name"), name
        references = node.metadata["dagster/code_references"].code_references
        assert references and all(Path(ref.file_path).is_file() for ref in references), name
        assert "current_state.py" not in references[0].file_path, f"{name} points at the factory, not its code"
    raw = graph.get(dg.AssetKey("raw_customers"))
    columns = {c.name: c for c in raw.metadata["dagster/column_schema"].columns}
    assert {"partition_date", "customer_id", "email"} <= set(columns) and columns["email"].tags == {"pii": "true"}
    assert graph.get(dg.AssetKey("customer_features")).metadata["dagster/code_references"].code_references[0] \
        .file_path.endswith("sql/customer_features.sql")
    undescribed = [str(check) for check in graph.asset_check_keys if not graph.get_check_spec(check).description]
    assert undescribed == []


def test_steps_that_call_a_model_are_retried_and_configuration_errors_are_not():
    from definitions import defs

    job = defs.resolve_job_def("daily_pipeline")
    model_steps = {node.name for node in job.graph.node_defs
                   if {"embedding_model", "chat_model"} & set(node.required_resource_keys)}
    assert model_steps == {"product_embeddings", "customer_segments"}
    for step in model_steps:
        policy = job.graph.node_named(step).definition.retry_policy
        assert policy is not None and policy.max_retries >= 1 and policy.backoff == dg.Backoff.EXPONENTIAL
