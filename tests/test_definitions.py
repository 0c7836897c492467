"""The code location loads the way `dagster dev` and `dagster definitions validate` load it."""

import subprocess
import sys
from pathlib import Path

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
