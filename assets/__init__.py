"""The pipeline, one room per step of a record's story (see README's map):

    common/     shared machinery: partitions, the source registry, the current-state abstraction, metadata
    ingest/     landing files -> raw.* partitions (valid | quarantined)
    validate/   the GX suites: compiled to row rules for ingestion, run by GX as checks
    transform/  the dbt-style sql/ models
    infer/      embeddings, segments, recommendations
    outputs/    business rules on recommendations
    evaluate/   offline quality against baselines
    monitor/    sensors that read the event log and raise alerts
"""
