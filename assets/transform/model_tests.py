"""dbt-style tests of the SQL models (`sql/schema.yml`), as blocking asset checks.

Each declared test counts the rows that break it, in the build's own transaction; the count is
a measurement of the build, so a skipped build reports the stored count (never a fresh pass), and
a violation fails the model's step (blocking) before anything builds on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

SCHEMA_FILE = "schema.yml"
KINDS = ("not_null", "unique", "accepted_values", "relationships")


@dataclass(frozen=True)
class ModelTest:
    kind: str
    column: str
    argument: Any = None  # the accepted values, or "model.column" of a relationship

    @property
    def name(self) -> str:
        return f"{self.kind}__{self.column}"

    @property
    def description(self) -> str:
        return {
            "not_null": f"no NULL {self.column}",
            "unique": f"no {self.column} twice",
            "accepted_values": f"{self.column} only in {self.argument}",
            "relationships": f"every {self.column} is in {self.argument}",
        }[self.kind]

    def violations_sql(self, table: str, schema: str) -> tuple[str, dict]:
        """A query of one number: the rows that break the test."""
        column = f'"{self.column}"'
        if self.kind == "not_null":
            return f"SELECT count(*) FILTER (WHERE {column} IS NULL) FROM {table}", {}
        if self.kind == "unique":
            return f"SELECT count({column}) - count(DISTINCT {column}) FROM {table}", {}
        if self.kind == "accepted_values":
            return (f"SELECT count(*) FILTER (WHERE {column} IS NOT NULL AND NOT list_contains($accepted, "
                    f"{column}::VARCHAR)) FROM {table}", {"accepted": [str(v) for v in self.argument]})
        other_model, other_column = self.argument.split(".")
        # An anti-join on the other model's distinct values, not NOT IN: one NULL there made every
        # NOT IN unknown (no violation ever counted), and it took 1.5 s against 0.6 s at 2M customers.
        return (f'SELECT count(*) FROM {table} AS child ANTI JOIN (SELECT DISTINCT "{other_column}" AS value '
                f'FROM {schema}.{other_model}) AS parent ON child.{column} = parent.value '
                f'WHERE child.{column} IS NOT NULL', {})


def schema_section(sql_dir: Path, name: str) -> Any:
    """One top-level section of `sql/schema.yml` (None when the file or the section is missing)."""
    path = sql_dir / SCHEMA_FILE
    return (yaml.safe_load(path.read_text()) or {}).get(name) if path.exists() else None


def load_tests(sql_dir: Path) -> dict[str, list[ModelTest]]:
    """Model name -> its tests, from `sql/schema.yml` (no file: no tests)."""
    declared = schema_section(sql_dir, "models") or {}
    tests: dict[str, list[ModelTest]] = {}
    for model, by_kind in declared.items():
        unknown = set(by_kind) - set(KINDS)
        if unknown:
            raise ValueError(f"sql/{SCHEMA_FILE}: {model} has unknown tests {sorted(unknown)}; known: {KINDS}")
        tests[model] = [ModelTest(kind, column) for kind in ("not_null", "unique") for column in by_kind.get(kind, [])]
        tests[model] += [ModelTest(kind, column, argument) for kind in ("accepted_values", "relationships")
                         for column, argument in (by_kind.get(kind) or {}).items()]
    return tests


def check_specs(model: str, tests: list[ModelTest]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(t.name, asset=model, blocking=True, description=f"dbt-style test: {t.description}")
            for t in tests]


def measure(con: Any, tests: list[ModelTest], table: str, schema: str) -> dict[str, int]:
    """The violations of each test, counted in the build's transaction."""
    counts = {}
    for test in tests:
        sql, params = test.violations_sql(table, schema)
        counts[test.name] = int(con.execute(sql, params).fetchall()[0][0])
    return counts


def verdicts(tests: list[ModelTest]):
    def judge(measured: Mapping[str, Any], config: Any) -> list[dg.AssetCheckResult]:
        violations = measured.get("test_violations", {})
        return [dg.AssetCheckResult(
            check_name=t.name,
            passed=violations.get(t.name, 0) == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"violations": float(violations.get(t.name, 0)), "rows": float(measured.get("rows", 0))},
            description=f"{violations.get(t.name, 0):,} rows break: {t.description}",
        ) for t in tests]

    return judge
