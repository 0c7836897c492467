"""Validate: rules declared once in expectations/, compiled to row rules (rules.py, used by
ingestion's quarantine) and run by GX itself as asset checks (gx_checks.py)."""

from assets.validate.gx_checks import build_suite_checks

__all__ = ["build_suite_checks"]
