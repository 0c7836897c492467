"""Helpers for tests of the lakehouse's storage."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from resources.lakehouse import Lakehouse


def files_left_behind(lakehouse: Lakehouse, table: str) -> set[str]:
    """Files in the table's folder that its current snapshot does not reference (metadata JSON aside)."""
    iceberg = lakehouse.catalog().load_table(table)
    snapshot = iceberg.current_snapshot()
    manifests = snapshot.manifests(iceberg.io)
    referenced = {snapshot.manifest_list, *(m.manifest_path for m in manifests),
                  *(task.file.file_path for task in iceberg.scan().plan_files())}
    folder = Path(unquote(urlparse(iceberg.location()).path))
    stored = {path.resolve().as_uri() for path in folder.rglob("*")
              if path.is_file() and not path.name.endswith(".metadata.json")}
    return {unquote(uri) for uri in stored} - {unquote(p if "://" in p else Path(p).resolve().as_uri()) for p in referenced}

