"""Speed and fidelity of the local embedding model by precision and threads (prints figures; not a test).

    python -m bench.embedding_speed [--texts 2000] [--batch-size 32]

Texts are the generated catalog's product texts (name. description. Category: ...), the texts
`product_embeddings` sends, about 35 word pieces each. Each setting embeds them in requests of
256 (as the embedding session does); the reference is float32 on one thread, and every other
setting reports texts/s, the speed-up and the smallest and mean cosine of its vectors to the
reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from generator.catalog import build_catalog, categories, product_descriptions, product_names
from generator.config import GeneratorConfig
from resources.model_clients.local import LocalSentenceTransformerClient, native_bfloat16

SETTINGS = [("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
REQUEST = 256


def catalog_texts(n: int) -> list[str]:
    catalog = build_catalog(GeneratorConfig(out=".", customers=100 * n, products=n))
    index = np.arange(n)
    parts = zip(product_names(catalog, index).to_pylist(), product_descriptions(catalog, index).to_pylist(),
                categories(catalog, index).to_pylist(), strict=True)
    return [f"{name}. {description}. Category: {category}" for name, description, category in parts]


def embed_all(client: LocalSentenceTransformerClient, texts: list[str]) -> tuple[np.ndarray, float]:
    client.embed(texts[:64])  # load and warm up
    clock = time.perf_counter()
    vectors = np.vstack([client.embed(texts[i:i + REQUEST]).vectors for i in range(0, len(texts), REQUEST)])
    return vectors, time.perf_counter() - clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    texts = catalog_texts(args.texts)
    print(f"{len(texts):,} catalog texts; native bfloat16 on this CPU: {native_bfloat16()}")
    reference, reference_rate = None, None
    for precision, threads in SETTINGS:
        client = LocalSentenceTransformerClient(torch_threads=threads, precision=precision,
                                                encode_batch_size=args.batch_size)
        vectors, seconds = embed_all(client, texts)
        rate = len(texts) / seconds
        if reference is None:
            reference, reference_rate = vectors, rate
        cosine = (vectors * reference).sum(axis=1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
        print(json.dumps({"precision": precision, "threads": threads, "texts_per_s": round(rate, 1),
                          "speedup": round(rate / reference_rate, 2), "cosine_min": round(float(cosine.min()), 5),
                          "cosine_mean": round(float(cosine.mean()), 6)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
