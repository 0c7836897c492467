"""The model selection's candidate tables (a benchmark, not a test).

    python -m bench.model_selection                  # Online Retail (up to 2011-08-31) + synthetic
    python -m bench.model_selection --customers 200000

For each dataset and as-of day: every candidate fitted before as-of minus the window and judged
by hit rate@10 on the new products customers bought in the window (recsys/selection.py), and
the one deployed. Online Retail data is read from --online-retail (default
../shared/data/online-retail/by-day); days after 2011-08-31 are never read.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import duckdb

from assets.evaluate.online_retail import load_online_retail, purchases_source
from recsys.selection import select_model
from recsys.synthetic import SyntheticRetail

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ONLINE_RETAIL = ROOT.parent / "shared" / "data" / "online-retail" / "by-day"
ONLINE_RETAIL_AS_OF = (datetime(2011, 6, 1), datetime(2011, 9, 1))


def show(name: str, selection) -> dict:
    print(f"\n{name}: window {selection.window[0]} .. {selection.window[1]} (exclusive), "
          f"{selection.evaluated_customers:,} customers judged of {selection.customers_sampled:,}, "
          f"{selection.seconds:.1f}s; deployed: {selection.chosen}")
    print(selection.to_markdown())
    return {"name": name, **selection.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--online-retail", default=str(DEFAULT_ONLINE_RETAIL))
    parser.add_argument("--customers", type=int, default=20_000, help="customers of the synthetic datasets")
    parser.add_argument("--window-days", type=int, default=60)
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    results = []
    folder = Path(args.online_retail)
    if folder.is_dir():
        con = duckdb.connect()
        load_online_retail(con, folder)
        source = purchases_source(con)
        for as_of in ONLINE_RETAIL_AS_OF:
            results.append(show(f"Online Retail as of {as_of:%Y-%m-%d}", select_model(source, as_of, window_days=args.window_days)))
    else:
        print(f"Online Retail not found at {folder}: skipped")
    structured = SyntheticRetail(customers=args.customers, products=2_000, topics=40, seed=7)
    for name, data in (("synthetic, topic structure (affinity 0.7)", structured),
                       ("synthetic, no structure (affinity 0: popularity must win)", replace(structured, topic_affinity=0.0))):
        as_of = data.start + timedelta(days=data.days - 30)
        results.append(show(name, select_model(data, as_of, window_days=args.window_days)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
