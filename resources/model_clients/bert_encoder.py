"""A BERT sentence encoder (mean pooling) in plain torch, for the local model.

sentence-transformers runs all-MiniLM-L6-v2 through `transformers`, whose import costs about 3 s
of a step's fresh process (torch 1.0 s, transformers 2.4 s, sentence-transformers 1.2 s, this
2-core machine); the catalog embedding pays it on every day with a new product text. The model is
six BERT layers, mean pooling and a normalization: here it is the same computation on the same
weights (`model.safetensors`) and the same tokenizer (`tokenizer.json`, through `tokenizers`),
which import with torch in about 1.1 s. Its vectors equal sentence-transformers' within 1e-6 in
float32 (tests/test_model_clients_local.py), at the same speed.

Only a model folder laid out as sentence-transformers saves a BERT with mean pooling qualifies
(`is_bert_mean_pooling`); any other model goes through sentence-transformers as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

MODULES = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
           "sentence_transformers.models.Normalize"]


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_bert_mean_pooling(path: Path) -> bool:
    """Transformer + mean Pooling (+ Normalize), the Transformer a plain BERT with GELU, absolute
    positions and safetensors weights: what BertEncoder computes exactly."""
    modules, config = _json(path / "modules.json"), _json(path / "config.json")
    if not isinstance(modules, list) or not isinstance(config, dict):
        return False
    types = [module.get("type") for module in modules]
    if types not in (MODULES, MODULES[:2]) or modules[0].get("path") not in ("", None):
        return False
    pooling = _json(path / modules[1]["path"] / "config.json") or {}
    modes = {key: value for key, value in pooling.items() if key.startswith("pooling_mode")}
    return (config.get("model_type") == "bert" and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and modes.get("pooling_mode_mean_tokens") is True and sum(bool(v) for v in modes.values()) == 1
            and (path / "model.safetensors").exists() and (path / "tokenizer.json").exists())


class BertEncoder:
    """Mean-pooled BERT token states (not normalized: the client normalizes in float32)."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        config = json.loads((path / "config.json").read_text())
        settings = _json(path / "sentence_bert_config.json") or {}
        self.heads, self.layers = config["num_attention_heads"], config["num_hidden_layers"]
        self.eps, self.dtype = config["layer_norm_eps"], dtype
        self.lower_case = bool(settings.get("do_lower_case", False))
        self.weights = {name.removeprefix("bert."): tensor.to(dtype)
                        for name, tensor in load_file(str(path / "model.safetensors")).items()}
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(settings.get("max_seq_length") or config["max_position_embeddings"]))
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0))

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), hidden) float32, in the order given; longest texts batched together first,
        as sentence-transformers batches them."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        pooled = torch.empty(len(texts), self.weights["embeddings.word_embeddings.weight"].shape[1])
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            pooled[rows] = self._encode_batch([texts[i] for i in rows])
        return pooled

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        texts = [text.strip().lower() if self.lower_case else text.strip() for text in texts]
        encoded = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        types = torch.tensor([e.type_ids for e in encoded])
        w, (n, length) = self.weights, ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = self._norm(x, "embeddings.LayerNorm")
        padding = torch.zeros(n, 1, 1, length, dtype=self.dtype).masked_fill(
            mask[:, None, None, :] == 0, torch.finfo(self.dtype).min)
        hidden = x.shape[-1]
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."
            q, k, v = (self._linear(x, p + f"attention.self.{name}").view(n, length, self.heads, -1).transpose(1, 2)
                       for name in ("query", "key", "value"))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=padding).transpose(1, 2).reshape(n, length, hidden)
            x = self._norm(self._linear(attended, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            x = self._norm(self._linear(F.gelu(self._linear(x, p + "intermediate.dense")), p + "output.dense") + x,
                           p + "output.LayerNorm")
        weights = mask.unsqueeze(-1).to(x.dtype)
        return ((x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).float()

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weights[f"{name}.weight"], self.weights[f"{name}.bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"])
