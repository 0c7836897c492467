"""Throughput of the embedding client against the fake OpenAI server (prints figures; not a test).

    python -m bench.model_clients [--latency 0.05] [--rate-limit 200] [--batch-size 32]
                                  [--concurrency 16] [--seconds 8] [--fault-rate 0.1]
                                  [--local] [--skip-remote]

The server runs in its own process (so it does not share our GIL) with a per-request latency and
a token-bucket rate limit. Compared, with the same batch size:

- seed loop: the seed's way, one batch at a time, 3 attempts with exponential backoff
  (0.5 s, 1 s), a batch that still fails is lost (its DLQ);
- our client: `EmbeddingModel(provider="openai").open().embed_items(...)`, the whole path
  including the DuckDB cache and item map writes, on a fresh warehouse.

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
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

from resources.model_clients import EmbeddingModel
from resources.warehouse import DuckDBWarehouse, fetch_scalar
from tests.fake_openai_server import expected_vector

ROOT = Path(__file__).resolve().parents[1]
STAGE = "bench_products"


def start_server(latency: float, rate_limit: float, burst: float, fault_rate: float) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "tests.fake_openai_server", "--latency", str(latency), "--rate-limit", str(rate_limit),
        "--burst", str(burst), "--transient-rate", str(fault_rate),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    base_url = server.stdout.readline().strip()  # type: ignore[union-attr]
    if not base_url.startswith("http"):
        server.kill()
        raise RuntimeError("the fake server did not start")
    return server, base_url


def server_stats(base_url: str, reset: bool = False) -> dict:
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/{'_reset' if reset else '_stats'}", timeout=5) as response:
        return json.load(response)


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


def our_client(base_url: str, items: list[tuple[str, str]], args: argparse.Namespace, workdir: Path) -> dict:
    warehouse = DuckDBWarehouse(path=str(workdir / "bench.duckdb"), memory_limit="512MB")
    model = EmbeddingModel(
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
    )
    with model.open() as embedder:
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
    server, base_url = start_server(args.latency, args.rate_limit, args.burst, fault_rate)
    try:
        seed_items = product_texts(args.seed_batches * args.batch_size, offset=0)
        seed = seed_loop(base_url, seed_items, args.batch_size, "bench-embed")
        our_count = int(args.rate_limit * args.seconds) * args.batch_size
        server_stats(base_url, reset=True)
        ours = our_client(base_url, product_texts(our_count, offset=10_000_000), args, workdir / name)
        stats = server_stats(base_url)
    finally:
        server.terminate()
        server.wait(10)
    rate_limit_items = args.rate_limit * args.batch_size
    return {
        "scenario": name,
        "fault_rate": fault_rate,
        "seed": seed,
        "ours": ours,
        "server": stats,
        "speedup": ours["items_per_second"] / seed["items_per_second"],
        "share_of_rate_limit": ours["items_per_second"] / rate_limit_items,
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

    client = LocalSentenceTransformerClient(encode_batch_size=args.local_encode_batch)
    load_seconds = time.perf_counter() - started
    tokenizer = client._model.tokenizer
    figures: dict = {"import_and_load_seconds": round(load_seconds, 2), "encode_batch_size": args.local_encode_batch}
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
        f"(burst {args.burst:.0f}), batch {args.batch_size}, our concurrency {args.concurrency}\n"
    )
    header = (
        f"{'scenario':<10} {'seed items/s':>12} {'seed lost':>9} {'ours items/s':>12} {'ours lost':>9} "
        f"{'speedup':>8} {'% of limit':>10} {'retries':>8} {'429s':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        seed, ours = r["seed"], r["ours"]
        retries = sum(ours["retries_by_cause"].values())
        print(
            f"{r['scenario']:<10} {seed['items_per_second']:>12.0f} {seed['lost']:>9} {ours['items_per_second']:>12.0f} "
            f"{ours['lost']:>9} {r['speedup']:>7.1f}x {r['share_of_rate_limit']:>9.0%} {retries:>8} "
            f"{r['server']['statuses'].get('429', 0):>5}"
        )
    if len(results) == 2:
        kept = results[1]["ours"]["items_per_second"] / results[0]["ours"]["items_per_second"]
        print(f"\nthroughput kept under faults: {kept:.0%}")


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
    parser.add_argument("--local", action="store_true", help="also measure the offline local model")
    parser.add_argument("--local-texts", type=int, default=1024)
    parser.add_argument("--local-encode-batch", type=int, default=32)
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
            f"\nlocal all-MiniLM-L6-v2 (torch CPU): import+load {local['import_and_load_seconds']} s, "
            f"short ({local['short']['tokens_per_text']} tokens) {local['short']['texts_per_second']} texts/s, "
            f"medium ({local['medium']['tokens_per_text']} tokens) {local['medium']['texts_per_second']} texts/s"
        )
    print("\n" + json.dumps(output, indent=1, default=float))


if __name__ == "__main__":
    main()
