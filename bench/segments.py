"""Benchmark of customer pooling and segmentation on synthetic data (a benchmark, not a test).

    python -m bench.segments --customers 200000
    python -m bench.segments --customers 2000000 --json-out bench/results/segments-2m.json

Purchases are generated block by block from a seed (never the whole base in memory), sorted by
customer id, about `--lines-per-customer` lines each, over a catalog of `--products` products
whose 384-dim vectors cluster by category; customers follow a few taste archetypes. Stages:

    pooling    generate + pool every customer (pass 1) and keep the fitting sample
    fitting    choose k and fit mini-batch k-means on the sample
    assigning  pass 2: pool again (timed apart, as "re-pooling"), assign segments, build profiles

For each stage: rows, seconds, rows/s and the peak RSS of that stage (the kernel's high-water
mark, reset between stages through /proc/self/clear_refs), as a table and as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys.customer_vectors import PoolingReport, ProductEmbeddings, iter_customer_vectors
from recsys.clustering import SegmentingConfig, fit_segments
from recsys.customer_sample import CustomerSample
from recsys.segment_ids import drop_empty_segments
from recsys.segment_profiles import RfmSummary, SegmentProfiler

# RFM comes from sql/customer_features.sql in the pipeline; this benchmark times the clustering only.
NO_RFM = RfmSummary(*[float("nan")] * 6)

DIMENSIONS = 384
AS_OF = dt.date(2024, 6, 30)
CATEGORIES = (
    "Home Decor", "Kitchen", "Garden", "Toys", "Stationery", "Lighting", "Bath", "Textiles",
    "Party", "Christmas", "Bags", "Jewellery", "Storage", "Pet Supplies", "Baby", "Crafts",
    "Tableware", "Candles", "Clocks", "Outdoor", "Beauty", "Books", "Games", "Gifts",
)


@dataclass(frozen=True)
class SyntheticCatalog:
    products: ProductEmbeddings
    category_of: dict[str, str]
    category_index: np.ndarray      # category of each product row
    category_starts: np.ndarray     # products are grouped by category
    archetypes: np.ndarray          # taste archetype x category purchase probabilities (cumulative)
    habits: np.ndarray              # per archetype: (lines factor, spend factor, mean days between)


def synthetic_catalog(n_products: int, n_archetypes: int, seed: int) -> SyntheticCatalog:
    rng = np.random.default_rng([seed, 1])
    centers = _unit(rng.standard_normal((len(CATEGORIES), DIMENSIONS), dtype=np.float32))
    category_index = np.sort(rng.integers(0, len(CATEGORIES), n_products))
    vectors = _unit(rng.standard_normal((n_products, DIMENSIONS), dtype=np.float32))
    vectors *= 0.9
    vectors += centers[category_index]
    ids = [f"P{i:06d}" for i in range(n_products)]
    tastes = rng.dirichlet(np.full(len(CATEGORIES), 0.25), size=n_archetypes)
    # Archetypes also differ in how often, how much and how lately they buy, so that the
    # profiles (and the names made from them) have something to tell apart.
    habits = np.column_stack([
        rng.uniform(0.5, 1.5, n_archetypes),
        rng.lognormal(0.0, 0.5, n_archetypes),
        rng.uniform(40, 300, n_archetypes),
    ])
    return SyntheticCatalog(
        products=ProductEmbeddings.from_arrays(ids, vectors),
        category_of={pid: CATEGORIES[c] for pid, c in zip(ids, category_index)},
        category_index=category_index,
        category_starts=np.searchsorted(category_index, np.arange(len(CATEGORIES) + 1)),
        archetypes=np.cumsum(tastes, axis=1),
        habits=habits,
    )


def iter_synthetic_purchases(
    catalog: SyntheticCatalog, n_customers: int, lines_per_customer: float, seed: int, block: int = 50_000
) -> Iterator[pa.RecordBatch]:
    """Purchase batches sorted by customer id; each block comes from its own seeded generator."""
    product_ids = catalog.products.product_ids
    as_of_us = np.datetime64(AS_OF, "us").astype(np.int64)
    for first in range(0, n_customers, block):
        rng = np.random.default_rng([seed, 2, first])
        count = min(block, n_customers - first)
        customer_archetype = rng.integers(0, len(catalog.archetypes), count)
        lines_factor, spend_factor, days_between = catalog.habits[customer_archetype].T
        lines = 1 + rng.poisson((lines_per_customer - 1) * lines_factor)
        customer = np.repeat(np.arange(count), lines)
        archetype = customer_archetype[customer]
        category = _draw_categories(catalog.archetypes, archetype, rng)
        start, stop = catalog.category_starts[category], catalog.category_starts[category + 1]
        # Popularity skew inside a category: low ranks sell more.
        product = start + ((stop - start) * rng.random(len(customer)) ** 2).astype(np.int64)
        product = np.minimum(product, np.maximum(stop - 1, start)).clip(max=len(product_ids) - 1)
        days_ago = np.minimum(rng.exponential(days_between[customer]), 3 * 365)
        purchased = as_of_us - (days_ago * 86_400e6).astype(np.int64)
        ids = pa.array([f"C{first + i:09d}" for i in range(count)])
        yield pa.record_batch(
            {
                "customer_id": ids.take(pa.array(customer)),
                "product_id": product_ids.take(pa.array(product)),
                "amount": np.round(rng.lognormal(2.5, 1.0, len(customer)) * spend_factor[customer], 2),
                "purchased_at": pa.array(purchased, type=pa.timestamp("us")),
            }
        )


def _draw_categories(cumulative: np.ndarray, archetype: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inverse-CDF draws: row a of `cumulative` shifted by a makes one sorted array for all rows."""
    n_categories = cumulative.shape[1]
    shifted = (cumulative + np.arange(len(cumulative))[:, None]).ravel()
    position = np.searchsorted(shifted, archetype + rng.random(len(archetype)))
    return np.minimum(position - archetype * n_categories, n_categories - 1)


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


class _TimedIterator:
    """Wraps an iterator and adds up the time spent producing its items."""

    def __init__(self, iterable):
        self._iterator = iter(iterable)
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self.seconds += time.perf_counter() - started


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers one stage only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not allowed: peaks then accumulate from the process start


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stage(name: str, rows: int, seconds: float, peak: int, **extra) -> dict:
    return {
        "stage": name,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds) if seconds > 0 else None,
        "peak_rss_mib": round(peak / 2**20, 1),
        **extra,
    }


def run(args: argparse.Namespace) -> dict:
    catalog = synthetic_catalog(args.products, args.archetypes, args.seed)
    report, sample = PoolingReport(), CustomerSample(args.sample_size, args.seed)
    pooling_stage = _pooling_stage(args, catalog, report, sample)
    fitting_stage, fit = _fitting_stage(args, sample)
    assigning_stage, profiler = _assigning_stage(args, catalog, fit.model)
    model, dropped = drop_empty_segments(fit.model, profiler.sizes)
    profiles = profiler.profiles(dict.fromkeys(profiler.sizes, NO_RFM), NO_RFM, catalog.category_of)
    stages = [pooling_stage, fitting_stage, assigning_stage]
    return {
        "machine": _machine(),
        "parameters": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        "stages": stages,
        "pooling_report": report.as_dict(),
        "fit": fit.summary(),
        "dropped_empty_segments": dropped,
        "segments": [{"id": p.segment_id, "size": p.size, "name": p.name} for p in profiles],
        "peak_rss_mib_max": max(stage["peak_rss_mib"] for stage in stages),
        "final_k": model.k,
    }


def _pooled_chunks(args: argparse.Namespace, catalog: SyntheticCatalog, report: PoolingReport | None = None):
    """Timed generation and timed pooled chunks (whose time includes the generation's)."""
    purchases = iter_synthetic_purchases(catalog, args.customers, args.lines_per_customer, args.seed)
    generated = _TimedIterator(purchases)
    chunks = iter_customer_vectors(
        generated, catalog.products, as_of=AS_OF, half_life_days=args.half_life_days,
        chunk_lines=args.chunk_lines, report=report,
    )
    pooled = _TimedIterator(chunks)
    return generated, pooled


def _pooling_stage(
    args: argparse.Namespace, catalog: SyntheticCatalog, report: PoolingReport, sample: CustomerSample
) -> dict:
    reset_peak_rss()
    generated, pooled = _pooled_chunks(args, catalog, report)
    for chunk in pooled:
        sample.add(chunk.customer_ids, chunk.vectors)
    seconds = pooled.seconds - generated.seconds
    return _stage("pooling", report.lines_in, seconds, peak_rss_bytes(), customers=report.customers_out,
                  generating_seconds=round(generated.seconds, 3))


def _fitting_stage(args: argparse.Namespace, sample: CustomerSample):
    reset_peak_rss()
    started = time.perf_counter()
    fit = fit_segments(sample.vectors, config=SegmentingConfig(seed=args.seed))
    return _stage("fitting", len(sample), time.perf_counter() - started, peak_rss_bytes(), k=fit.model.k), fit


def _assigning_stage(args: argparse.Namespace, catalog: SyntheticCatalog, model):
    """Pass 2: pool again (timed apart), assign and profile every chunk."""
    reset_peak_rss()
    started = time.perf_counter()
    profiler = SegmentProfiler(model.segment_ids, catalog.products.product_ids)
    generated, pooled = _pooled_chunks(args, catalog)
    for chunk in pooled:
        profiler.add(model.assign(chunk.vectors), chunk.product_spend)
    profiler.profiles(dict.fromkeys(profiler.sizes, NO_RFM), NO_RFM, catalog.category_of)
    seconds = time.perf_counter() - started - pooled.seconds
    stage = _stage("assigning", sum(profiler.sizes.values()), seconds, peak_rss_bytes(),
                   repooling_seconds=round(pooled.seconds - generated.seconds, 3),
                   generating_seconds=round(generated.seconds, 3))
    return stage, profiler


def _machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "python": sys.version.split()[0],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def format_table(result: dict) -> str:
    header = f"{'stage':<10} {'rows':>12} {'seconds':>9} {'rows/s':>12} {'peak RSS MiB':>13}"
    lines = [header, "-" * len(header)]
    for stage in result["stages"]:
        lines.append(
            f"{stage['stage']:<10} {stage['rows']:>12,} {stage['seconds']:>9.2f} "
            f"{stage['rows_per_second'] or 0:>12,} {stage['peak_rss_mib']:>13.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--lines-per-customer", type=float, default=10.0)
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--archetypes", type=int, default=10, help="taste archetypes in the synthetic data")
    parser.add_argument("--chunk-lines", type=int, default=200_000)
    parser.add_argument("--sample-size", type=int, default=20_000)
    parser.add_argument("--half-life-days", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="also write the JSON result to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    segments = "; ".join(f"{s['id']}: {s['name']} ({s['size']:,})" for s in result["segments"])
    print(f"k={result['final_k']}  {segments}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
