"""CLI: python -m generator --out DIR --customers N --days D --start 2011-09-01 --seed S [...]"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

from generator import FAULT_TYPES, FaultRates, GeneratorConfig, generate


def parse_args(argv: list[str]) -> GeneratorConfig:
    parser = argparse.ArgumentParser(prog="python -m generator", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="landing folder to write into")
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--days", type=int, default=1)
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2011, 9, 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--products", type=int, default=None, help="catalog size (default customers/100)")
    parser.add_argument("--new-customer-share", type=float, default=0.05)
    parser.add_argument("--returning-share", type=float, default=0.02)
    parser.add_argument("--chunk-customers", type=int, default=50_000)
    parser.add_argument("--fault-rate", type=float, default=0.0, help="rate of every fault type")
    for fault in FAULT_TYPES:
        parser.add_argument(f"--{fault.replace('_', '-')}", type=float, default=None, help=f"rate of {fault}")
    args = parser.parse_args(argv)
    rates = FaultRates.uniform(args.fault_rate)
    overrides = {f: getattr(args, f) for f in FAULT_TYPES if getattr(args, f) is not None}
    return GeneratorConfig(
        out=args.out, customers=args.customers, days=args.days, start=args.start, seed=args.seed,
        products=args.products, faults=dataclasses.replace(rates, **overrides),
        new_customer_share=args.new_customer_share, returning_share=args.returning_share,
        chunk_customers=args.chunk_customers,
    )


def main(argv: list[str]) -> int:
    summary = generate(parse_args(argv))
    print(json.dumps({"seconds": round(summary.seconds, 1),
                      "days": [{"day": d.day, **d.records, "purchase_items": d.purchase_items} for d in summary.days]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
