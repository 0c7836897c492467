"""Shared machinery of every room: partitions, the source registry, the current-state
abstraction and metadata helpers."""
