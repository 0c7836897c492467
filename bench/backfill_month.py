"""A month's backfill at demo scale as the UI launches it: one run over the range of days.

    python -m bench.backfill_month [--customers 5000] [--days 30] [--model local|fake]

Generates `--days` days of demo data, then runs every asset and check of the code location over
the whole range in one in-process run (what the daemon does with a single-run backfill; the
daemon adds its launch, about 10 s), with the local embedding model by default. Prints the
wall time of the run, the model's load time and the peak RSS, as one JSON line; then the same
range again (every day unchanged: a skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import tempfile
import time
from pathlib import Path

START = dt.date(2011, 9, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--model", choices=("local", "fake"), default="local")
    args = parser.parse_args()
    last = START + dt.timedelta(days=args.days - 1)
    os.environ.update(PIPELINE_FIRST_DAY=START.isoformat(), PIPELINE_LAST_DAY=last.isoformat(),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    import dagster as dg

    from definitions import defs
    from generator import FaultRates, GeneratorConfig, generate
    from resources.alerts import Alerts
    from resources.compute_engine import ComputeEngine
    from resources.landing import LandingZone
    from resources.model_clients import ChatModel, EmbeddingModel
    from resources.warehouse import DuckDBWarehouse

    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        generate(GeneratorConfig(out=root / "landing", customers=args.customers, days=args.days, start=START,
                                 seed=42, faults=FaultRates.uniform(0.002)))
        generated = time.perf_counter() - started
        warehouse = DuckDBWarehouse(path=str(root / "warehouse.duckdb"))
        server = None
        if args.model == "fake":
            from tests.fake_openai_server import FakeOpenAIServer
            server = FakeOpenAIServer(default_dimensions=384).__enter__()
            embedding = EmbeddingModel(provider="openai", model="fake-embed", dimensions=384,
                                       base_url=server.base_url, api_key="bench-key")
        else:
            embedding = EmbeddingModel(provider="local")
        resources = {"warehouse": warehouse, "landing": LandingZone(root=str(root / "landing")),
                     "alerts": Alerts(warehouse=warehouse), "embedding_model": embedding,
                     "chat_model": ChatModel(provider="none"), "compute_engine": ComputeEngine()}
        tags = {"dagster/asset_partition_range_start": START.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat()}
        config = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}}
        figures = {"customers": args.customers, "days": args.days, "model": args.model,
                   "generate_seconds": round(generated, 1)}
        for label in ("first", "again"):
            started = time.perf_counter()
            result = dg.materialize([*defs.assets, *defs.asset_checks], resources=resources, tags=tags,
                                    run_config=config, raise_on_error=False)
            figures[f"{label}_run_seconds"] = round(time.perf_counter() - started, 1)
            figures[f"{label}_run_success"] = result.success
            embedded = [e for e in result.get_asset_materialization_events()
                        if e.asset_key.to_user_string() == "product_embeddings"]
            if embedded:
                meta = embedded[-1].materialization.metadata
                figures[f"{label}_model_load_seconds"] = meta["model_load_seconds"].value \
                    if "model_load_seconds" in meta else None
        figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if server is not None:
            server.__exit__(None, None, None)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
