"""Infer: product embeddings, customer segments and recommendations (the AI stages)."""

from assets.infer.embeddings import product_embeddings
from assets.infer.recommendations import recommendations
from assets.infer.segments import customer_segments

ASSETS = [product_embeddings, customer_segments, recommendations]
