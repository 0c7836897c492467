"""Throughput of the embedding client against the fake OpenAI server (prints figures; not a test).

    python -m bench.model_clients [--latency 0.05] [--rate-limit 200] [--batch-size 32]
                                  [--concurrency 16] [--seconds 8] [--fault-rate 0.1]
                                  [--local] [--skip-remote]

The server runs in its own process (so it does not share our GIL) with a per-request latency and
a token-bucket rate limit. Compared, with the same batch size:

- seed loop: the seed's way, one batch at a time, 3 attempts with exponential backoff
  (0.5 s, 1 s), a batch that still fails is lost (its DLQ);
- our client, request layer only ("client"): the session's pool, throttle, retries, breaker and
  output checks, storing nothing, like the seed loop (the like-for-like comparison);
- our client, end to end ("end-to-end"): `EmbeddingModel(provider="openai").open().embed_items`,
  i.e. plus the DuckDB cache, item map and DLQ writes (group commits on the session's database
  thread) on a fresh warehouse. On 2 cores those writes compete with HTTP for the same CPU.

Both run clean and with `--fault-rate` transient faults (429, 500, 503, dropped connections,
malformed JSON, short answers). Loss is checked in DuckDB: every item must have its vector, and
sampled vectors must equal the server's deterministic ones.

`--local` also measures the offline model (all-MiniLM-L6-v2, torch CPU): import + load time,
and texts/s for short (~8 token) and medium (~60 token) texts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from resources.model_clients import EmbeddingModel
from resources.warehouse import DuckDBWarehouse, fetch_scalar
from tests.fake_openai_server import expected_vector, in_own_process, stats_of

STAGE = "bench_products"


def product_texts(count: int, offset: int) -> list[tuple[str, str]]:
    numbers = range(offset, offset + count)
    return [(f"p{n}", f"product {n}: a cotton shirt in size {n % 7}, colour {n % 13}") for n in numbers]


def seed_loop(base_url: str, items: list[tuple[str, str]], batch_size: int, model: str) -> dict:
    """The seed's batch loop: sequential, 3 attempts, exponential backoff, failures lost to a DLQ."""
    client = openai.OpenAI(base_url=base_url, api_key="bench-key", max_retries=0, timeout=10)
    dead_letter: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        for attempt in range(3):
            try:
                client.embeddings.create(input=[text for _, text in batch], model=model)
                break
            except Exception:  # the seed caught everything
                if attempt == 2:
                    dead_letter.extend(key for key, _ in batch)
                else:
                    time.sleep(0.5 * 2**attempt)
    seconds = time.perf_counter() - started
    client.close()
    return {"items": len(items), "seconds": seconds, "items_per_second": len(items) / seconds, "lost": len(dead_letter)}


def bench_model(base_url: str, args: argparse.Namespace) -> EmbeddingModel:
    return EmbeddingModel(
        provider="openai",
        model="bench-embed",
        dimensions=args.dimensions,
        base_url=base_url,
        api_key="bench-key",
        max_batch_size=args.batch_size,
        max_concurrency=args.concurrency,
        request_timeout_seconds=5,
        backoff_base_seconds=0.05,
        backoff_cap_seconds=1.0,
        write_chunk_rows=args.write_chunk_rows,
    )


def our_client_only(base_url: str, items: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """The request layer alone (pool, throttle, retries, breaker, checks), storing nothing: what
    the seed loop does too, so this is the like-for-like comparison."""
    texts = {key: text for key, text in items}
    with bench_model(base_url, args).open() as embedder:
        metrics = embedder.new_metrics()
        batches = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        started = time.perf_counter()
        with ThreadPoolExecutor(embedder.concurrency) as pool:
            outcomes = list(pool.map(lambda batch: embedder.embed_batch(batch, metrics), batches))
        seconds = time.perf_counter() - started
    embedded = dict(pair for outcome in outcomes for pair in outcome.embedded)
    wrong = sum(
        not np.allclose(vector, expected_vector(texts[key], args.dimensions), atol=1e-6)
        for key, vector in list(embedded.items())[::97]
    )
    figures = metrics.as_dict()
    return {
        "items": len(items),
        "seconds": seconds,
        "items_per_second": len(items) / seconds,
        "requests": figures["requests"],
        "retries_by_cause": figures["retries_by_cause"],
        "latency_ms_p50": figures["latency_ms_p50"],
        "latency_ms_p99": figures["latency_ms_p99"],
        "lost": len(items) - len(embedded),
        "wrong_vectors": wrong,
    }


def our_end_to_end(base_url: str, items: list[tuple[str, str]], args: argparse.Namespace, workdir: Path) -> dict:
    """`embed_items`: the request layer plus the DuckDB cache, item map and DLQ writes."""
    warehouse = DuckDBWarehouse(path=str(workdir / "bench.duckdb"), memory_limit="512MB")
    with bench_model(base_url, args).open() as embedder:
        # Once a process: the first Arrow conversion imports pandas (~0.4 s). A Dagster step
        # never pays it inside the step, the code location has imported pandas already.
        embedder.embed_items(warehouse, product_texts(args.batch_size, offset=90_000_000), stage="bench_warm_up")
        report = embedder.embed_items(warehouse, items, stage=STAGE)
        stored, wrong = verify(embedder, warehouse, items, args.dimensions)
    figures = report.as_dict()
    return {
        "items": len(items),
        "seconds": figures["seconds"],
        "items_per_second": len(items) / figures["seconds"],
        "requests": figures["requests"],
        "retries_by_cause": figures["retries_by_cause"],
        "throttle_wait_seconds": figures["throttle_wait_seconds"],
        "latency_ms_p50": figures["latency_ms_p50"],
        "latency_ms_p99": figures["latency_ms_p99"],
        "dlq_count": figures["dlq_count"],
        "lost": len(items) - stored,
        "wrong_vectors": wrong,
    }


def verify(embedder, warehouse: DuckDBWarehouse, items: list[tuple[str, str]], dimensions: int) -> tuple[int, int]:
    """(items with a stored vector, sampled vectors that differ from the server's)."""
    with warehouse.connect(read_only=True) as con:
        stored = fetch_scalar(
            con,
            """SELECT count(*) FROM ops.embedding_items m JOIN ops.embedding_cache c USING (model, dimensions, text_hash)
               WHERE m.stage = ?""",
            [STAGE],
        )
    texts = dict(items)
    wrong = 0
    for keys, matrix in embedder.iter_numpy(warehouse, stage=STAGE, batch_rows=4096):
        for key, vector in list(zip(keys, matrix))[::97]:
            wrong += not np.allclose(vector, expected_vector(texts[key], dimensions), atol=1e-6)
    return int(stored), wrong


def run_scenario(name: str, fault_rate: float, args: argparse.Namespace, workdir: Path) -> dict:
    with in_own_process(args.latency, args.rate_limit, args.burst, fault_rate) as base_url:
        seed_items = product_texts(args.seed_batches * args.batch_size, offset=0)
        seed = seed_loop(base_url, seed_items, args.batch_size, "bench-embed")
        count = int(args.rate_limit * args.seconds) * args.batch_size
        stats_of(base_url, reset=True)
        client = our_client_only(base_url, product_texts(count, offset=10_000_000), args)
        client_server = stats_of(base_url, reset=True)
        end_to_end = our_end_to_end(base_url, product_texts(count, offset=20_000_000), args, workdir / name)
        end_to_end_server = stats_of(base_url)
    limit_items_per_second = args.rate_limit * args.batch_size
    return {
        "scenario": name,
        "fault_rate": fault_rate,
        "seed": seed,
        "client": {**client, "server": client_server},
        "end_to_end": {**end_to_end, "server": end_to_end_server},
        "speedup_client": client["items_per_second"] / seed["items_per_second"],
        "speedup_end_to_end": end_to_end["items_per_second"] / seed["items_per_second"],
        "share_of_rate_limit_client": client["items_per_second"] / limit_items_per_second,
        "share_of_rate_limit_end_to_end": end_to_end["items_per_second"] / limit_items_per_second,
    }


SHORT_TEXTS = ["red cotton t-shirt", "stainless steel knife", "vintage glass tumbler", "wool winter scarf"]
MEDIUM_TEXT = (
    "Product {i}: a hand-finished ceramic coffee mug with a speckled glaze, holds 350 ml, dishwasher "
    "and microwave safe, sold as a set of two in a recycled cardboard gift box, ideal for cafes and "
    "kitchens, shipped from our warehouse within two working days"
)


def bench_local(args: argparse.Namespace) -> dict:
    """Load time and texts/s of the offline model (one process, torch's own threads)."""
    started = time.perf_counter()
    from resources.model_clients.local import LocalSentenceTransformerClient

    client = LocalSentenceTransformerClient(encode_batch_size=args.local_encode_batch, torch_threads=args.local_threads)
    load_seconds = time.perf_counter() - started
    tokenizer = client._model.tokenizer
    figures: dict = {
        "import_and_load_seconds": round(load_seconds, 2),
        "encode_batch_size": args.local_encode_batch,
        "torch_threads": args.local_threads,
    }
    kinds = {"short": lambda i: f"{SHORT_TEXTS[i % 4]} number {i}", "medium": lambda i: MEDIUM_TEXT.format(i=i)}
    for name, make in kinds.items():
        texts = [make(i) for i in range(args.local_texts)]
        tokens = np.mean([len(tokenizer(t)["input_ids"]) for t in texts[:50]])
        client.embed(texts[:64])  # warm-up
        t0 = time.perf_counter()
        for start in range(0, len(texts), 256):
            client.embed(texts[start : start + 256])
        seconds = time.perf_counter() - t0
        figures[name] = {
            "texts": len(texts),
            "tokens_per_text": round(float(tokens), 1),
            "texts_per_second": round(len(texts) / seconds, 1),
        }
    return figures


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nfake server: {args.latency * 1000:.0f} ms latency, rate limit {args.rate_limit:.0f} req/s "
        f"(burst {args.burst:.0f}), batch {args.batch_size}, our concurrency {args.concurrency}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    header = (
        f"{'scenario':<8} {'path':<11} {'items/s':>8} {'lost':>5} {'vs seed':>8} {'of limit':>9} "
        f"{'retries':>8} {'429s':>5} {'p50 ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        seed = r["seed"]
        print(f"{r['scenario']:<8} {'seed loop':<11} {seed['items_per_second']:>8.0f} {seed['lost']:>5}")
        for path in ("client", "end_to_end"):
            run = r[path]
            retries = sum(run["retries_by_cause"].values())
            print(
                f"{'':<8} {path.replace('_', '-'):<11} {run['items_per_second']:>8.0f} {run['lost']:>5} "
                f"{r[f'speedup_{path}']:>7.1f}x {r[f'share_of_rate_limit_{path}']:>8.0%} {retries:>8} "
                f"{run['server']['statuses'].get('429', 0):>5} {run['latency_ms_p50']:>7.0f}"
            )
    if len(results) == 2:
        for path in ("client", "end_to_end"):
            kept = results[1][path]["items_per_second"] / results[0][path]["items_per_second"]
            print(f"throughput kept under {results[1]['fault_rate']:.0%} faults ({path.replace('_', '-')}): {kept:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--rate-limit", type=float, default=200.0, help="server requests/s")
    parser.add_argument("--burst", type=float, default=20.0, help="server token-bucket capacity")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dimensions", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=8.0, help="our run's length at the rate limit")
    parser.add_argument("--seed-batches", type=int, default=60, help="batches for the (slow) seed loop")
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--write-chunk-rows", type=int, default=EmbeddingModel().write_chunk_rows)
    parser.add_argument("--local", action="store_true", help="also measure the offline local model")
    parser.add_argument("--local-texts", type=int, default=1024)
    parser.add_argument("--local-encode-batch", type=int, default=32)
    parser.add_argument("--local-threads", type=int, default=EmbeddingModel().local_threads, help="0 = torch default")
    parser.add_argument("--skip-remote", action="store_true")
    args = parser.parse_args()
    output: dict = {"settings": vars(args), "load_average": os.getloadavg()}
    if not args.skip_remote:
        with tempfile.TemporaryDirectory(prefix="bench_model_clients_") as tmp:
            workdir = Path(tmp)
            output["results"] = [
                run_scenario("clean", 0.0, args, workdir),
                run_scenario("faults", args.fault_rate, args, workdir),
            ]
        print_table(output["results"], args)
    if args.local:
        output["local_model"] = local = bench_local(args)
        print(
            f"\nlocal all-MiniLM-L6-v2 (torch CPU, {args.local_threads or 'default'} threads): "
            f"import+load {local['import_and_load_seconds']} s, "
            f"short ({local['short']['tokens_per_text']} tokens) {local['short']['texts_per_second']} texts/s, "
            f"medium ({local['medium']['tokens_per_text']} tokens) {local['medium']['texts_per_second']} texts/s"
        )
    print("\n" + json.dumps(output, indent=1, default=float))


if __name__ == "__main__":
    main()
