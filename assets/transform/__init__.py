"""Transform: the dbt-style SQL models of sql/, one asset each."""

from assets.transform.sql_models import build_sql_assets

__all__ = ["build_sql_assets"]
