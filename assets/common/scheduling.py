"""How a run shares its two places (definitions.py) between the steps that are ready.

The warehouse writers form a chain on the way to the model stage (ingestion, then the SQL
models). A run launches them one at a time (their `warehouse_pool` tag). The steps that only
read beside them, the GX suites and the catalog embedding, take the other place one at a time
(the `run_lane` tag below), so that the next writer always finds a free place: at 2M customers,
the catalog embedding and a suite once held both places while the writer chain waited 3.3 s.
When both lanes have a step ready, `dagster/priority` (higher first, 0 when unset) decides.
"""

BESIDE_WRITERS_TAGS = {"run_lane": "beside_writers"}

# The catalog embedding loads the local model (about 10 s at 2M customers even on a day with a
# few new products) and gates recommendations and segments: it and dim_products, its input, go
# first, so that it runs beside the customers' SQL models and not after them.
ON_THE_WAY_TO_THE_MODEL = 1

# A GX suite feeds no other step: it waits when a step that builds the day is ready too.
SUITE = -1


def step_tags(priority: int = 0, beside_writers: bool = False) -> dict[str, str]:
    return {**({"dagster/priority": str(priority)} if priority else {}),
            **(BESIDE_WRITERS_TAGS if beside_writers else {})}
