"""GX suites: compiled to DuckDB for the row-level quarantine, and run by GX as partition checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.common.sources import SOURCES
from assets.monitor.check_alerts import asset_check_failure_alerts
from assets.monitor.settings import MonitoringSettings
from assets.validate.gx_checks import validate_partition
from assets.validate.rules import Suite, compile_expectation, load_suite, quarantine
from generator import FAULTS_BY_TABLE, FaultRates, manifest_path
from resources.warehouse import fetch_all, fetch_scalar
from tests.ingestion_support import RAW_ASSETS, START, check_results, day, generate_landing, materialization, materialize, raw_resources

# Which expectation catches each fault that hits one field; whole-line faults have a parse rule.
EXPECTATION_OF_FAULT = {
    "missing_field": "expect_column_values_to_not_be_null",
    "non_numeric_amount": "expect_column_values_to_be_of_type",
    "bad_date": "expect_column_values_to_be_of_type",
    "negative_amount": "expect_column_values_to_be_between",
    "invalid_email": "expect_column_values_to_match_regex",
    "invalid_uuid": "expect_column_values_to_match_regex",
    "unknown_product_id": "expect_column_values_to_be_in_set",
}
PARSE_RULE_OF_FAULT = {"malformed_json": "malformed_json", "wrong_column_count": "wrong_column_count",
                       "bad_encoding": "bad_encoding"}
COLUMN_OF_FIELD = {field: column for source in SOURCES for field, column in source.fields.items()}


def expected_rule(table: str, fault: str, field: str) -> str:
    suite = load_suite(table)
    if fault in PARSE_RULE_OF_FAULT:
        return PARSE_RULE_OF_FAULT[fault]
    if fault == "duplicate_record":
        kinds = ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique")
        return next(e["meta"]["rule"] for e in suite.expectations if e["type"] in kinds)
    column = COLUMN_OF_FIELD[field]
    return next(e["meta"]["rule"] for e in suite.expectations
                if e["type"] == EXPECTATION_OF_FAULT[fault] and e["kwargs"].get("column") == column)


@pytest.fixture(scope="module")
def faulty_landing(tmp_path_factory) -> Path:
    return generate_landing(tmp_path_factory.mktemp("faulty"), customers=600, days=2,
                            faults=FaultRates.uniform(0.012), seed=11)


def injected_faults(landing: Path, partition: str) -> set[tuple]:
    with open(manifest_path(landing, START.fromisoformat(partition))) as handle:
        rows = list(csv.DictReader(handle))
    return {(r["table"], int(r["line_no"]), int(r["item_no"]) if r["item_no"] else None,
             expected_rule(r["table"], r["fault"], r["field"])) for r in rows}


def quarantined(warehouse) -> set[tuple]:
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(con, "SELECT table_name, line_no, record_key, rule FROM ops.schema_errors")
    return {(t, line, int(key.rsplit("#", 1)[1]) if t == "customer_purchases" else None, rule)
            for t, line, key, rule in rows}


def test_every_injected_fault_is_quarantined_with_its_reason_and_counts_reconcile(warehouse, faulty_landing):
    resources = raw_resources(warehouse, faulty_landing)
    for index in (0, 1):
        result = materialize(resources, day(index))
        for (asset, check), evaluation in check_results(result).items():
            if check == "record_accounting":
                assert evaluation.passed, (asset, evaluation.metadata)
        customers = materialization(result, "raw_customers")
        assert customers["input_records"] == customers["valid_records"] + customers["quarantined_records"]
    expected = injected_faults(faulty_landing, day(0)) | injected_faults(faulty_landing, day(1))
    faults_seen = {fault for table, faults in FAULTS_BY_TABLE.items() for fault in faults}
    with open(manifest_path(faulty_landing, START)) as handle:
        assert {r["fault"] for r in csv.DictReader(handle)} == faults_seen  # every fault type was injected
    assert quarantined(warehouse) == expected


def test_counts_per_rule_match_the_fault_log(warehouse, faulty_landing):
    result = materialize(raw_resources(warehouse, faulty_landing), day(0))
    by_rule: dict[str, int] = {}
    for table, line, item, rule in injected_faults(faulty_landing, day(0)):
        if table == "customers":
            by_rule[rule] = by_rule.get(rule, 0) + 1
    assert materialization(result, "raw_customers")["quarantined_by_rule"] == by_rule


def test_error_rate_over_the_limit_is_one_incident_with_the_measured_rate(warehouse, tmp_path):
    """The check fails as ERROR with the rate it measured; the check-failure sensor turns it into
    one alert (the run raises none of its own), and a small batch's breach is only a WARN."""
    landing = generate_landing(tmp_path / "landing", customers=200, days=1,
                               faults=FaultRates(invalid_email=0.1), seed=5)
    transactions = landing / "transactions" / f"{day(0)}.csv"
    header, *rows = transactions.read_text().splitlines()
    transactions.write_text("\n".join([header, *rows[:-1], rows[-1].rsplit(",", 1)[0]]) + "\n")  # 1 bad row
    resources = raw_resources(warehouse, landing)
    with dg.instance_for_test() as instance:
        result = dg.materialize(RAW_ASSETS, partition_key=day(0), resources=resources, instance=instance)
        with warehouse.connect(read_only=True) as con:  # the run itself raised no alert
            assert not fetch_scalar(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'alerts'")
        with dg.build_sensor_context(instance=instance, resources={
                "alerts": resources["alerts"], "monitoring": MonitoringSettings()}) as context:
            asset_check_failure_alerts(context)
    customers = check_results(result)[("raw_customers", "error_rate")]
    assert not customers.passed and customers.severity.value == "ERROR"
    assert customers.metadata["error_rate"].value == pytest.approx(0.1, abs=0.03)
    assert f"{customers.metadata['error_rate'].value:.1%}" in customers.description
    assert check_results(result)[("raw_products", "error_rate")].passed
    small = check_results(result)[("raw_transactions", "error_rate")]
    assert not small.passed and small.severity.value == "WARN"  # one bad row in a dozen
    with warehouse.connect(read_only=True) as con:
        alerts = fetch_all(con, "SELECT severity, source, message, details FROM ops.alerts ORDER BY severity")
    assert [(severity, json.loads(details)["check"]) for severity, _, _, details in alerts] == [
        ("ERROR", "error_rate"), ("WARN", "error_rate")]
    assert "records bad: error_rate" in alerts[0][2]


def test_the_suites_pass_on_what_landed_and_report_what_was_quarantined_before(warehouse, faulty_landing):
    """GX finds nothing wrong in the landed rows (the quarantine took the bad ones out), and each
    check reports, beside that verdict, the share of the batch as it arrived that was quarantined:
    over 5 % (this batch has about 7 % bad records) the check is not green."""
    result = materialize(raw_resources(warehouse, faulty_landing), day(0), with_suite_checks=True)
    checks = check_results(result)
    with warehouse.connect(read_only=True) as con:
        counts = {t: c for (tc,) in fetch_all(con, "SELECT table_counts FROM ops.batch_fingerprints")
                  for t, c in json.loads(tc).items()}
    for table in ("products", "customers", "customer_purchases", "transactions"):
        asset = next(source.asset for source in SOURCES if table in source.table_names)
        evaluation = checks[(asset, f"{table}_expectation_suite")]
        meta = {k: v.value for k, v in evaluation.metadata.items()}
        assert meta["failed_rules"] == [] and meta["rows_validated"] == meta["rows_in_partition"] > 0
        share = counts[table]["quarantined_records"] / counts[table]["input_records"]
        assert meta["rejected_share"] == round(share, 6) > 0
        assert evaluation.passed == (share <= 0.05)
        assert evaluation.passed or evaluation.severity.value == "WARN"


def test_the_suite_check_finds_bad_rows_even_across_batches(warehouse, faulty_landing):
    materialize(raw_resources(warehouse, faulty_landing), day(0))
    chunk_rows = 50
    with warehouse.transaction() as con:
        # Batches follow the customer_id order: copy the last customer of the first batch, so that
        # the copy would open the second batch if batches could split a key.
        con.execute("""INSERT INTO raw.customers SELECT partition_date, 999999, customer_id, email, created_at,
                       purchase_count FROM raw.customers WHERE partition_date = ?
                       ORDER BY customer_id LIMIT 1 OFFSET ?""", [day(0), chunk_rows - 1])
        con.execute("""UPDATE raw.customer_purchases SET amount = -1
                       WHERE (line_no, item_no) IN (SELECT (line_no, item_no) FROM raw.customer_purchases LIMIT 1)""")
        # a line three days before its batch day: GX reads the window from the suite's parameters
        con.execute("""UPDATE raw.transactions SET invoice_date = invoice_date - INTERVAL 3 DAY
                       WHERE line_no = (SELECT max(line_no) FROM raw.transactions)""")
    for table, rule, batch in (("customers", "customer_id_duplicate", chunk_rows),
                               ("customer_purchases", "amount_negative", 2_000),
                               ("transactions", "invoice_date_off_the_batch_day", 2_000)):
        suite = load_suite(table)
        tallies, validated, total = validate_partition(warehouse, suite, f"raw.{table}", day(0), chunk_rows=batch)
        failed = {t.rule: t.unexpected_count for t in tallies if not t.success}
        assert validated == total and failed == {rule: 2 if table == "customers" else 1}


def test_a_raw_suite_check_judges_every_row_of_the_partition_when_gx_sees_a_sample(warehouse, faulty_landing):
    """A landed row that breaks a rule fails the partition's suite check even when GX's sample
    misses it: the suite's row-level rules are counted in SQL over the whole partition. (GX used
    to see at most max_rows rows and nothing else judged the rest.)"""
    from assets.validate.gx_checks import SuiteCheckConfig, raw_suite_check

    materialize(raw_resources(warehouse, faulty_landing), day(0))
    with warehouse.transaction() as con:
        con.execute("""INSERT INTO raw.customers SELECT partition_date, 999999, customer_id, email, created_at,
                       purchase_count FROM raw.customers WHERE partition_date = ? ORDER BY customer_id LIMIT 1""",
                    [day(0)])
        con.execute("""UPDATE raw.customer_purchases SET amount = -1
                       WHERE (line_no, item_no) IN (SELECT (line_no, item_no) FROM raw.customer_purchases LIMIT 1)""")
    config = SuiteCheckConfig(max_rows=1)
    for table, rule, breaking in (("customers", "customer_id_duplicate", 2), ("customer_purchases", "amount_negative", 1)):
        result = raw_suite_check(warehouse, load_suite(table), table, day(0), "raw_customers", config)
        meta = {k: v.value for k, v in result.metadata.items()}
        assert meta["rows_validated"] < 10 < meta["rows_in_partition"]
        assert not result.passed and meta["failed_rules"] == [rule]
        assert meta["unexpected_by_rule"][rule] == 0  # GX's sample did not hold the break
        assert meta["breaking_in_sql_by_rule"] == {r: (breaking if r == rule else 0) for r in meta["breaking_in_sql_by_rule"]}
    products = raw_suite_check(warehouse, load_suite("products"), "products", day(0), "raw_products", config)
    assert products.metadata["failed_rules"].value == []  # and the rows as landed break nothing


def test_an_empty_partition_breaks_no_rule():
    """A day without rows counts 0 breaks per rule (count_if over no rows is NULL in DuckDB: the
    check failed with a TypeError on a day whose customers all went to quarantine)."""
    from assets.validate.rules import count_rule_breaks

    con = duckdb.connect()
    con.execute("CREATE TABLE customers (partition_date DATE, customer_id VARCHAR, email VARCHAR, "
                "created_at TIMESTAMP, purchase_count INTEGER)")
    counts = count_rule_breaks(con, load_suite("customers"), "customers", "WHERE partition_date = $partition_date",
                               {"partition_date": "2011-09-01"})
    assert set(counts) == set(load_suite("customers").rule_names) and set(counts.values()) == {0}


def staged(rows: list[tuple], columns: list[str]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE stg (row_id BIGINT, line_no BIGINT, " + ", ".join(f"{c} VARCHAR" for c in columns) + ")")
    con.executemany(f"INSERT INTO stg VALUES ({', '.join(['?'] * (len(columns) + 2))})",
                    [(i, i, *row) for i, row in enumerate(rows, start=1)])
    con.execute("CREATE TABLE failures (row_id BIGINT, line_no BIGINT, record_key VARCHAR, rule VARCHAR,"
                " column_name VARCHAR, value VARCHAR)")
    return con


EXPECTATION_CASES = [  # (expectation, values of column v, the failing lines)
    ({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "v"}}, ["a", None], [2]),
    ({"type": "expect_column_values_to_be_unique", "kwargs": {"column": "v"}}, ["a", "b", "a", None, None], [3]),
    ({"type": "expect_column_values_to_match_regex", "kwargs": {"column": "v", "regex": "^[0-9]+$"}},
     ["12", "1a", None], [2]),
    ({"type": "expect_column_values_to_not_match_regex", "kwargs": {"column": "v", "regex": "x"}}, ["ax", "b"], [1]),
    ({"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "v", "value_set": ["a", "b"]}},
     ["a", "c", None], [2]),
    ({"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "v", "value_set": ["a"]}}, ["a", "c"], [1]),
    ({"type": "expect_column_values_to_be_of_type", "kwargs": {"column": "v", "type_": "float64"}},
     ["1.5", "-2", "abc", "nan", None, '"3"'], [3, 4, 6]),
    ({"type": "expect_column_values_to_be_of_type", "kwargs": {"column": "v", "type_": "int32"}},
     ["6", "6.5", "x", "-3"], [2, 3]),
    ({"type": "expect_column_values_to_be_of_type", "kwargs": {"column": "v", "type_": "datetime64[us]"}},
     ["2011-08-14T10:22:00.000Z", "2011-02-30 10:00:00", "yesterday", ""], [2, 3, 4]),
    ({"type": "expect_column_values_to_match_strftime_format", "kwargs": {"column": "v", "strftime_format": "%d/%m/%Y"}},
     ["31/12/2011", "2011-12-31"], [2]),
    ({"type": "expect_column_values_to_be_dateutil_parseable", "kwargs": {"column": "v"}}, ["2011-12-31", "nope"], [2]),
    ({"type": "expect_column_value_lengths_to_be_between", "kwargs": {"column": "v", "min_value": 2, "max_value": 3}},
     ["a", "ab", "abcd"], [1, 3]),
]


@pytest.mark.parametrize("expectation, values, failing", EXPECTATION_CASES)
def test_each_expectation_type_compiles_to_a_row_predicate(expectation, values, failing):
    con = staged([(v,) for v in values], ["v"])
    suite = Suite("t", (dict(expectation, meta={"rule": "r"}),), "digest")
    quarantine(con, suite, "stg", {"v", "line_no"}, "CAST(row_id AS VARCHAR)", "failures", "2011-09-01")
    assert [r[0] for r in fetch_all(con, "SELECT line_no FROM failures ORDER BY 1")] == failing


def test_a_suite_quarantines_what_its_rules_quarantine_one_by_one():
    """Every expectation type in one suite over all the values: the rows that break any rule are
    found in one scan, then judged rule by rule; the failures (rows, rules, values) equal those
    of each rule run alone over every row, and the scan's table is gone."""
    values = [v for _, case_values, _ in EXPECTATION_CASES for v in case_values]
    expectations = tuple(dict(e, meta={"rule": f"r{i}"}) for i, (e, _, _) in enumerate(EXPECTATION_CASES))
    together = staged([(v,) for v in values], ["v"])
    quarantine(together, Suite("t", expectations, "d"), "stg", {"v", "line_no"}, "CAST(row_id AS VARCHAR)",
               "failures", "2011-09-01")
    one_by_one = staged([(v,) for v in values], ["v"])
    for expectation in expectations:
        quarantine(one_by_one, Suite("t", (expectation,), "d"), "stg", {"v", "line_no"}, "CAST(row_id AS VARCHAR)",
                   "failures", "2011-09-01")
    rows = "SELECT * FROM failures ORDER BY ALL"
    assert fetch_all(together, rows) == fetch_all(one_by_one, rows)
    assert len(fetch_all(together, rows)) > len(EXPECTATION_CASES)
    assert fetch_all(together, "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'suspects%'") == []


def test_between_uses_the_declared_type_and_strictness():
    expectations = (
        {"type": "expect_column_values_to_be_of_type", "kwargs": {"column": "v", "type_": "float64"}, "meta": {"rule": "t"}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "v", "min_value": 0, "max_value": 10,
                                                                  "strict_max": True}, "meta": {"rule": "range"}},
    )
    con = staged([("9",), ("10",), ("-0.5",), ("100",), ("abc",)], ["v"])
    quarantine(con, Suite("t", expectations, "d"), "stg", {"v", "line_no"}, "'k'", "failures", "2011-09-01")
    assert fetch_all(con, "SELECT line_no, rule FROM failures ORDER BY 1") == [
        (2, "range"), (3, "range"), (4, "range"), (5, "t")]


def test_compound_uniqueness_keeps_the_first_of_identical_rows():
    expectation = {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["a", "b"]},
                   "meta": {"rule": "duplicate_line"}}
    con = staged([("1", "x"), ("1", None), ("1", "x"), ("1", None), ("2", "x")], ["a", "b"])
    quarantine(con, Suite("t", (expectation,), "d"), "stg", {"a", "b", "line_no"}, "'k'", "failures", "2011-09-01")
    assert fetch_scalar(con, "SELECT list(line_no ORDER BY line_no) FROM failures") == [3, 4]


@pytest.mark.parametrize("expectation, error", [
    ({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "v"}}, "meta.rule"),
    ({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "nope"}, "meta": {"rule": "r"}}, "not a column"),
    ({"type": "expect_column_pair_values_to_be_equal", "kwargs": {"column_A": "v", "column_B": "v"},
      "meta": {"rule": "r"}}, "no row-level"),
])
def test_a_suite_that_cannot_compile_is_refused(expectation, error):
    with pytest.raises(ValueError, match=error):
        compile_expectation(expectation, "p_", {"v"}, {})


def test_the_shipped_suites_compile_against_their_tables():
    for spec in (table for source in SOURCES for table in source.tables):
        suite = load_suite(spec.name)
        rules = suite.row_rules(set(spec.columns) | {"line_no"})
        assert [r.rule for r in rules] == suite.rule_names
        assert set(suite.column_types) <= set(spec.columns)


def test_a_large_partition_is_validated_on_a_repeatable_sample_of_about_max_rows(warehouse, faulty_landing):
    """Beyond max_rows the suite sees a sample chosen by a hash of each row: the same rows every
    time, about max_rows of them, streamed (a reservoir sample held its rows in DuckDB's memory)."""
    materialize(raw_resources(warehouse, faulty_landing), day(0))
    suite = load_suite("customer_purchases")
    _, everything, total = validate_partition(warehouse, suite, "raw.customer_purchases", day(0), chunk_rows=500)
    assert everything == total > 1_000
    wanted = total // 4
    runs = [validate_partition(warehouse, suite, "raw.customer_purchases", day(0), chunk_rows=500, max_rows=wanted)
            for _ in range(2)]
    (_, first, first_total), (_, second, _) = runs
    assert first_total == total and first == second and 0.6 * wanted < first < 1.4 * wanted
    assert [t.unexpected_count for t in runs[0][0]] == [t.unexpected_count for t in runs[1][0]]


def test_a_stored_raw_suite_verdict_is_reused_only_for_the_same_sample(warehouse, faulty_landing):
    """The verdict is kept per landed batch, suite and sample; another max_rows validates again
    (the batch's fingerprint once overwrote the sample's part of the key)."""
    from assets.validate.gx_checks import run_suite_check

    materialize(raw_resources(warehouse, faulty_landing), day(0))
    suite = load_suite("customer_purchases")
    check = lambda max_rows: run_suite_check(  # noqa: E731
        warehouse, suite, "raw.customer_purchases", day(0), "raw_customers", 500, max_rows)
    first = check(0)  # the materialization already judged the default sample: another one is new work
    again, other = check(0), check(100)
    assert not first.metadata.get("reused_result") and again.metadata.get("reused_result")
    assert not other.metadata.get("reused_result")


def _outputs_with_planted_breaks(warehouse) -> None:
    """A typed recommendations table (as the pipeline writes it): customers c0..c49 are clean,
    c50..c52 each break rules of expectations/recommendations.json."""
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA outputs")
        con.execute("""CREATE TABLE outputs.recommendations AS
                       SELECT 'c' || (i // 5) AS customer_id, (i % 5 + 1)::SMALLINT AS rank, 'p' || (i % 5) AS product_id,
                              0.5::DOUBLE AS confidence, 20.0::DOUBLE AS predicted_value, 'collaborative' AS strategy
                       FROM range(250) AS t(i)""")
        con.execute("""INSERT INTO outputs.recommendations VALUES
            ('c50', 1, 'p1', 'NaN'::DOUBLE, 'inf'::DOUBLE, 'collaborative'),  -- confidence missing (NaN), value out of range
            ('c50', 0, 'p1', 1.5, NULL, 'collaborative'),                      -- a repeated pair, rank 0, confidence > 1, value missing
            ('c51', 2, NULL, 0.2, 'NaN'::DOUBLE, 'guess'),                     -- product missing, value missing (NaN), unknown strategy
            ('c52', 3, 'p3', NULL, -1.0, 'popularity')                         -- confidence missing, value below 0""")


def test_sql_counts_the_suite_rules_on_typed_tables_as_gx_does(warehouse):
    """count_rule_breaks reads a suite like GX (NaN is missing, nulls fail only null checks, a
    repeated key counts each of its rows): over the same rows, the same count for every rule."""
    _outputs_with_planted_breaks(warehouse)
    suite = load_suite("recommendations")
    tallies, validated, total = validate_partition(warehouse, suite, "outputs.recommendations", None, chunk_rows=1_000,
                                                   every_row_in_sql=True)
    assert validated == total == 254
    by_rule = {t.rule: (t.unexpected_count, t.rows_breaking_in_sql) for t in tallies}
    assert {rule: gx for rule, (gx, _) in by_rule.items()} == {rule: sql for rule, (_, sql) in by_rule.items()}
    assert by_rule == {
        "customer_id_missing": (0, 0), "product_id_missing": (1, 1), "product_recommended_twice": (2, 2),
        "rank_out_of_range": (1, 1), "confidence_missing": (2, 2), "confidence_outside_0_1": (1, 1),
        "predicted_value_missing": (2, 2), "predicted_value_outside_range": (2, 2), "strategy_unknown": (1, 1)}


def test_every_row_in_scope_is_judged_in_sql_when_gx_sees_a_sample(warehouse):
    """A break GX's sample misses still fails its rule: SQL counted every row in scope. Rows out
    of scope (`only`) are not judged, and without breaks in scope every rule passes."""
    _outputs_with_planted_breaks(warehouse)
    suite = load_suite("recommendations")
    tallies, validated, _ = validate_partition(warehouse, suite, "outputs.recommendations", None, chunk_rows=1_000,
                                               max_rows=1, every_row_in_sql=True)
    assert validated < 10
    failed = {t.rule for t in tallies if not t.success}
    assert failed == {"product_id_missing", "product_recommended_twice", "rank_out_of_range", "confidence_missing",
                      "confidence_outside_0_1", "predicted_value_missing", "predicted_value_outside_range",
                      "strategy_unknown"}
    clean, _, _ = validate_partition(warehouse, suite, "outputs.recommendations", None, chunk_rows=1_000, max_rows=1,
                                     only="customer_id NOT IN ('c50', 'c51', 'c52')", every_row_in_sql=True)
    assert all(t.success and t.rows_breaking_in_sql == 0 for t in clean)


def test_sql_compares_numeric_columns_as_numbers_as_gx_does(warehouse):
    """A value set on a numeric column holds numbers: 1.0 is in [1, 2], whatever its text."""
    from assets.validate.rules import Suite

    _outputs_with_planted_breaks(warehouse)
    suite = Suite("ranks", ({"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "rank", "value_set": [1, 2, 3, 4, 5]},
                             "meta": {"rule": "rank_unknown"}},
                            {"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "confidence", "value_set": [1.5]},
                             "meta": {"rule": "confidence_forbidden"}}), "test")
    tallies, _, _ = validate_partition(warehouse, suite, "outputs.recommendations", None, chunk_rows=1_000,
                                       every_row_in_sql=True)
    assert {t.rule: (t.unexpected_count, t.rows_breaking_in_sql) for t in tallies} == {
        "rank_unknown": (1, 1), "confidence_forbidden": (1, 1)}


@pytest.mark.parametrize("zone", ["Europe/London", "Pacific/Kiritimati", "America/Los_Angeles"])
def test_an_order_line_dated_more_than_a_day_from_its_batch_day_is_quarantined(zone):
    """The transactions suite keeps a line dated a day either side of its file's day in the
    source's zone; one further off (day and month swapped, a two-digit year read as 1911, a file
    in another day's place) is quarantined, named by rule, not landed on a wrong day."""
    suite = load_suite("transactions")
    rules = ("invoice_date_not_a_timestamp", "invoice_date_off_the_batch_day")
    kept = ["2011-09-01 10:00:00", "2011-08-31 23:30:00", "2011-09-01 00:00:00", "2011-09-02 23:59:00",
            "2011-09-01T10:00:00+14:00", "2011-09-01T23:00:00-10:00"]
    off = ["2011-01-09 10:00:00", "2011-08-29 10:00:00", "1911-09-01 10:00:00", "2011-09-04T12:00:00Z"]
    con = staged([(v,) for v in kept + off], ["invoice_date"])
    expectations = tuple(e for e in suite.expectations if e["meta"]["rule"] in rules)
    quarantine(con, Suite("t", expectations, "d"), "stg", {"invoice_date", "line_no"}, "'k'", "failures",
               "2011-09-01", naive_timezone=zone)
    assert fetch_all(con, "SELECT line_no, rule FROM failures ORDER BY 1") == [
        (len(kept) + i, "invoice_date_off_the_batch_day") for i in range(1, len(off) + 1)]
