"""One partition a day: each daily landing batch is one partition of every batch asset."""

import dagster as dg

# The Online Retail data starts on 2010-12-01; generated data may use any later day.
FIRST_DAY = "2010-12-01"

daily_partitions = dg.DailyPartitionsDefinition(start_date=FIRST_DAY)
