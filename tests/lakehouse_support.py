"""Helpers for tests of the lakehouse's storage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
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



@dataclass
class LocalS3:
    endpoint: str
    client: Any  # boto3's S3 client
    storage_options: dict[str, str]


@contextmanager
def local_s3(bucket: str = "lake") -> Iterator[LocalS3]:
    """moto's S3 server on 127.0.0.1 with an empty bucket: it stands in for S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        keys = {"aws_access_key_id": "test-key-id", "aws_secret_access_key": "test-secret"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        client.create_bucket(Bucket=bucket)
        yield LocalS3(endpoint, client, {"s3.endpoint": endpoint, "s3.region": "us-east-1",
                                         "s3.access-key-id": keys["aws_access_key_id"],
                                         "s3.secret-access-key": keys["aws_secret_access_key"]})
    finally:
        server.stop()
