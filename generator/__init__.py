"""Synthetic landing data: products, customers (JSON Lines) and transactions (Online Retail CSV).

    from generator import GeneratorConfig, FaultRates, generate
    summary = generate(GeneratorConfig(out=Path("data/landing"), customers=10_000, days=3, seed=7,
                                       faults=FaultRates.uniform(0.002)))

Deterministic for a config, vectorized, written a chunk of customers at a time. Every injected
fault is listed in `<out>/_manifest/faults/<day>.csv` (source, table, line_no, item_no,
record_key, fault, field); `<out>/_manifest/summary.json` has the counts.
"""

from generator.config import FAULT_TYPES, FAULTS_BY_TABLE, FaultRates, GeneratorConfig
from generator.run import GenerationSummary, generate, landing_paths, manifest_path

__all__ = ["FAULT_TYPES", "FAULTS_BY_TABLE", "FaultRates", "GenerationSummary", "GeneratorConfig", "generate",
           "landing_paths", "manifest_path"]
