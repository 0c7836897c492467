"""The only doors to the outside world. `build_resources()` picks implementations from the
environment, so the same definitions run on embedded defaults or against real services."""

from __future__ import annotations

import os

import dagster as dg

from resources.alerts import Alerts
from resources.compute_engine import ComputeEngine
from resources.lakehouse import Lakehouse
from resources.landing import (DEFAULT_LANDING_DIR, LandingZone, checked_encoding, checked_strftime_format, parse_days,
                               parse_weekdays)
from resources.model_clients import ChatModel, EmbeddingModel
from resources.warehouse import DEFAULT_STEP_MEMORY_BUDGET, DEFAULT_WAREHOUSE_PATH, DuckDBWarehouse


def build_resources(source_names: tuple[str, ...] = ()) -> dict[str, object]:
    """Resources for the code location, chosen by environment variables (see README)."""
    resources: dict[str, object] = {
        "warehouse": DuckDBWarehouse(
            path=os.getenv("WAREHOUSE_PATH", DEFAULT_WAREHOUSE_PATH),
            memory_limit=os.getenv("DUCKDB_MEMORY_LIMIT", "1GB"),
            step_memory_budget=step_memory_budget(),
        ),
    }
    resources["landing"] = landing_zone(source_names)
    if os.getenv("ALERT_WEBHOOK_URL") and not os.environ["ALERT_WEBHOOK_URL"].startswith(("http://", "https://")):
        # Said without the value: the URL is a secret. Every alert would fail to leave.
        raise ValueError("ALERT_WEBHOOK_URL is not an http(s) URL (https://...): alerts could not be delivered")
    resources["alerts"] = Alerts(
        warehouse=resources["warehouse"],
        # An unset variable means no webhook (dg.EnvVar would fail the load on a missing variable).
        webhook_url=dg.EnvVar("ALERT_WEBHOOK_URL") if os.getenv("ALERT_WEBHOOK_URL") else None,
        slack_token=dg.EnvVar("SLACK_BOT_TOKEN") if os.getenv("SLACK_BOT_TOKEN") else None,
        slack_channel=os.getenv("SLACK_CHANNEL") or None,
    )
    resources["embedding_model"] = embedding_model()
    resources["chat_model"] = chat_model()
    resources["compute_engine"] = compute_engine()
    if lakehouse_configured():
        resources["lakehouse"] = lakehouse()
    return resources


def step_memory_budget() -> str | None:
    """STEP_MEMORY_BUDGET (default 1GiB; `none` turns it off: every connection gets DUCKDB_MEMORY_LIMIT)."""
    value = os.getenv("STEP_MEMORY_BUDGET", DEFAULT_STEP_MEMORY_BUDGET).strip()
    return None if value.lower() in ("", "none", "off") else value


def lakehouse_configured() -> bool:
    return bool(os.getenv("LAKEHOUSE_CATALOG_URI") or os.getenv("LAKEHOUSE_REST_URI"))


def pipeline_backend() -> str:
    """PIPELINE_BACKEND: where the daily run the schedule and the landing sensor start keeps its
    tables: `warehouse` (default: the DuckDB file, daily_pipeline) or `lakehouse` (Iceberg,
    lakehouse_pipeline; needs a lakehouse configured)."""
    backend = os.getenv("PIPELINE_BACKEND", "warehouse").strip().lower() or "warehouse"
    if backend not in ("warehouse", "lakehouse"):
        raise ValueError(f"PIPELINE_BACKEND={backend!r}: use warehouse or lakehouse")
    if backend == "lakehouse" and not lakehouse_configured():
        raise ValueError("PIPELINE_BACKEND=lakehouse needs LAKEHOUSE_CATALOG_URI or LAKEHOUSE_REST_URI")
    return backend


def lakehouse() -> Lakehouse:
    """LAKEHOUSE_CATALOG_URI (a SQLAlchemy URL of the SQL catalog, read through dg.EnvVar: it may
    hold a password) or LAKEHOUSE_REST_URI with LAKEHOUSE_REST_TOKEN (a bearer token, through
    dg.EnvVar); LAKEHOUSE_LOCATION (a path or s3://bucket/prefix)."""
    return Lakehouse(
        catalog_uri=dg.EnvVar("LAKEHOUSE_CATALOG_URI") if os.getenv("LAKEHOUSE_CATALOG_URI") else None,
        rest_uri=os.getenv("LAKEHOUSE_REST_URI") or None,
        rest_token=dg.EnvVar("LAKEHOUSE_REST_TOKEN") if os.getenv("LAKEHOUSE_REST_TOKEN") else None,
        location=os.getenv("LAKEHOUSE_LOCATION", "data/lakehouse"),
    )


def compute_engine() -> ComputeEngine:
    """COMPUTE_ENGINE=threads (default: in the step's process) or ray; RAY_ADDRESS (unset: a
    private local Ray for the step), RAY_WORKERS (2), SQL_SHARDS (keyed SQL models' full builds in
    hash shards; RAY_SQL_SHARDS, its older name, is read too), INGEST_SHARD_MB (a plain JSON Lines
    or CSV landing file larger than this is read and judged in shards of about this size; 0: whole)."""
    shards = os.getenv("SQL_SHARDS") or os.getenv("RAY_SQL_SHARDS") or "0"
    return ComputeEngine(kind=os.getenv("COMPUTE_ENGINE", "threads"), address=os.getenv("RAY_ADDRESS") or None,
                         workers=int(os.getenv("RAY_WORKERS", "2")), sql_shards=int(shards),
                         ingest_shard_mb=int(os.getenv("INGEST_SHARD_MB", "0")))


def landing_zone(source_names: tuple[str, ...]) -> LandingZone:
    """LANDING_DIR, and LANDING_<SOURCE>_PATTERN to point one source elsewhere (e.g. Online Retail);
    LANDING_<SOURCE>_TIMESTAMP_FORMAT (strftime) for files that do not write ISO 8601 timestamps;
    LANDING_<SOURCE>_ENCODING (latin-1, cp1252...) for files not written in UTF-8;
    LANDING_CLOSED_WEEKDAYS (e.g. Sat) and LANDING_CLOSED_DAYS (YYYY-MM-DD, comma-separated): the
    days no file comes, which land as closed days and are not expected by the freshness sensor."""
    patterns = {source: os.environ[f"LANDING_{source.upper()}_PATTERN"]
                for source in source_names if os.getenv(f"LANDING_{source.upper()}_PATTERN")}
    formats = {source: checked_strftime_format(os.environ[f"LANDING_{source.upper()}_TIMESTAMP_FORMAT"])
               for source in source_names if os.getenv(f"LANDING_{source.upper()}_TIMESTAMP_FORMAT")}
    encodings = {source: checked_encoding(os.environ[f"LANDING_{source.upper()}_ENCODING"])
                 for source in source_names if os.getenv(f"LANDING_{source.upper()}_ENCODING")}
    return LandingZone(root=os.getenv("LANDING_DIR", DEFAULT_LANDING_DIR), patterns=patterns, timestamp_formats=formats,
                       encodings={source: name for source, name in encodings.items() if name},  # None: UTF-8
                       closed_weekdays=parse_weekdays(os.getenv("LANDING_CLOSED_WEEKDAYS", "")),
                       closed_days=parse_days(os.getenv("LANDING_CLOSED_DAYS", "")))


def _openai_endpoint() -> dict[str, object]:
    """OPENAI_BASE_URL, OPENAI_API_KEY (as dg.EnvVar, only when set: keyless servers exist) and
    AZURE_OPENAI_API_VERSION (set it to talk to Azure OpenAI; OPENAI_BASE_URL is the endpoint)."""
    return {
        "base_url": os.getenv("OPENAI_BASE_URL") or None,
        "api_key": dg.EnvVar("OPENAI_API_KEY") if os.getenv("OPENAI_API_KEY") else None,
        "azure_api_version": os.getenv("AZURE_OPENAI_API_VERSION") or None,
        "max_concurrency": int(os.getenv("MODEL_MAX_CONCURRENCY", "8")),
    }


def embedding_model() -> EmbeddingModel:
    """MODEL_PROVIDER=local (default: offline all-MiniLM-L6-v2, no key) or openai (any
    OpenAI-compatible endpoint); EMBEDDING_MODEL, EMBEDDING_DIMENSIONS, EMBEDDING_BATCH_SIZE,
    EMBEDDING_PRICE_PER_1K_TOKENS, AZURE_OPENAI_DEPLOYMENT, EMBEDDING_BATCH_API_MIN_TEXTS (0: off)."""
    if os.getenv("MODEL_PROVIDER", "local") != "openai":
        return EmbeddingModel(provider="local")
    return EmbeddingModel(
        provider="openai",
        model=os.getenv("EMBEDDING_MODEL", "text-embedding-3-small"),
        dimensions=int(os.getenv("EMBEDDING_DIMENSIONS", "1536")),
        azure_deployment=os.getenv("AZURE_OPENAI_DEPLOYMENT") or None,
        max_batch_size=int(os.getenv("EMBEDDING_BATCH_SIZE", "256")),
        price_per_1k_tokens=float(os.getenv("EMBEDDING_PRICE_PER_1K_TOKENS", "0")),
        batch_api_min_texts=int(os.getenv("EMBEDDING_BATCH_API_MIN_TEXTS", "0")),
        **_openai_endpoint(),
    )


def chat_model() -> ChatModel:
    """Disabled unless MODEL_PROVIDER=openai and CHAT_MODEL are set (AZURE_OPENAI_CHAT_DEPLOYMENT)."""
    if os.getenv("MODEL_PROVIDER", "local") != "openai" or not os.getenv("CHAT_MODEL"):
        return ChatModel(provider="none")
    return ChatModel(
        provider="openai",
        model=os.environ["CHAT_MODEL"],
        azure_deployment=os.getenv("AZURE_OPENAI_CHAT_DEPLOYMENT") or None,
        price_per_1k_tokens=float(os.getenv("CHAT_PRICE_PER_1K_TOKENS", "0")),
        **_openai_endpoint(),
    )
