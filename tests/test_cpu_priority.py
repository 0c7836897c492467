"""Steps with slack yield the cores: in a process of their own they lower its CPU priority; run in
their caller's process they leave it alone (a process cannot raise its priority back)."""

import os

import dagster as dg

from resources.cpu_priority import BACKGROUND_NICENESS, BACKGROUND_TAGS, is_background, yield_cores_if_background


def niceness_op(name: str, tags: dict):
    @dg.op(name=name, tags=tags)
    def _op(context: dg.OpExecutionContext) -> int:
        yield_cores_if_background(context)
        return os.nice(0)

    return _op


background_step, path_step = niceness_op("background_step", BACKGROUND_TAGS), niceness_op("path_step", {})


def two_steps_job() -> dg.JobDefinition:
    from definitions import STEP_PROCESSES  # the executor the daily pipeline runs on: forked step processes

    @dg.job(executor_def=STEP_PROCESSES)
    def two_steps():
        background_step()
        path_step()

    return two_steps


def test_a_step_with_slack_lowers_its_own_process_priority_and_a_step_on_the_path_keeps_it(tmp_path):
    before = os.nice(0)
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        # the step processes import this job by module path, from the project root
        job = dg.build_reconstructable_job("tests.test_cpu_priority", "two_steps_job")
        with dg.execute_job(job, instance=instance) as result:
            assert result.success
            assert result.output_for_node("background_step") == max(before, BACKGROUND_NICENESS)
            assert result.output_for_node("path_step") == before
    assert os.nice(0) == before


def test_a_step_with_slack_run_in_the_callers_process_leaves_its_priority_alone():
    before = os.nice(0)

    @dg.job
    def in_process():
        background_step()

    result = in_process.execute_in_process()
    assert result.output_for_node("background_step") == before == os.nice(0)


def test_the_steps_with_slack_are_the_suites_segments_and_the_evaluation_and_none_on_the_outputs_path():
    from definitions import defs

    nodes = {node.name: node for node in defs.resolve_job_def("daily_pipeline").graph.node_defs}
    background = {name for name, node in nodes.items() if is_background(node.tags)}
    suites = {name for name in nodes if name.endswith("_expectation_suite")}
    assert len(suites) >= 5
    assert background == suites | {"customer_segments", "recommendation_quality"}
    # what the day's outputs wait for keeps the cores: the writers, the catalog embedding, the model, the rules
    assert {"raw_customers", "stg_purchases", "product_embeddings", "recommendations",
            "validated_recommendations"} <= set(nodes) - background
