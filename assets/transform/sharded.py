"""SQL models on the compute engine: the model's own DuckDB SQL, run shard by shard on the
engine's workers (Ray), with no translation to another dialect.

A model declared `incremental:` in sql/schema.yml has a unique key, and a key's rows depend only
on that key's input rows and on the lookups. So its full build can be cut by hash(key): under a
short read connection each keyed input is copied to Parquet partitioned by `hash(key) % shards`,
each lookup whole; each worker runs the SELECT in an in-memory DuckDB over its shard
(recsys.engines.run_sql_shard); the step then loads the shards' rows in its write transaction.
No lock is held while the workers compute. With the threads engine and `sql_shards` set, the
same shards run one after another in the step's process: the lever for a model whose single
query does not fit in the warehouse's memory_limit (stg_customer_history at 20M customers).
Incremental days stay in the warehouse: they touch a few keys, which is cheaper than shipping
the inputs. A model without a key cannot be cut: on Ray it runs whole as one shard on one worker
(every input whole), which moves its work off the step's machine but does not spread it.
"""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from assets.common.current_state import StateBuild
from assets.transform.incremental import Incremental
from recsys.engines import run_sql_shard

SHARDS_PER_WORKER = 2


@contextmanager
def computed_on_engine(build: StateBuild, model, spec: Incremental | None, params: dict, engine
                       ) -> Iterator[tuple[Path, int, int]]:
    """(folder of the rows as Parquet files, rows, shards); the scratch files go on exit.
    `spec` None: the model has no key, one shard."""
    shards = 1 if spec is None else engine.sql_shards or engine.workers * SHARDS_PER_WORKER
    build.warehouse.scratch_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"sharded-{model.name}-", dir=build.warehouse.scratch_dir))
    try:
        inputs = copy_inputs(build, model, spec, shards, folder / "in")
        out = folder / "out"
        out.mkdir()
        shared = (model.sql, params, inputs, str(out), build.warehouse.memory_limit)
        # threads: one shard at a time, so the step holds one shard's DuckDB (that is the point)
        counts = engine.ordered_map(run_sql_shard, range(shards), shared=shared, threads=1)
        rows = sum(count for _, count in counts)
        yield out, rows, shards
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def copy_inputs(build: StateBuild, model, spec: Incremental | None, shards: int, folder: Path
                ) -> dict[str, tuple[str, bool]]:
    """Each input as Parquet: keyed ones split by hash of the key, lookups (and every input of a
    model without a key) whole; under one read lock."""
    inputs = {}
    with build.warehouse.connect(read_only=True) as con:
        bound = spec.bind(con, model.tables_read) if spec is not None else None
        for table in model.tables_read:
            target = folder / table
            target.mkdir(parents=True)
            keyed = bound is not None and table in bound.keyed_inputs
            con.execute(f"COPY (SELECT * FROM {table} LIMIT 0) TO '{quoted(target / 'empty.parquet')}' (FORMAT parquet)")
            if keyed:
                con.execute(f"""COPY (SELECT *, hash({bound.unique_key}) % {shards} AS shard FROM {table})
                                TO '{quoted(target / 'shards')}' (FORMAT parquet, PARTITION_BY (shard))""")
            else:
                con.execute(f"COPY {table} TO '{quoted(target / 'all.parquet')}' (FORMAT parquet)")
            inputs[table] = (str(target), keyed)
    return inputs


def quoted(path: Path) -> str:
    """A path of our own scratch folder inside a SQL string literal."""
    return str(path).replace("'", "''")
