"""The output table: its row schema, the Delta Lake store, the lock, what an output may hold, readers for
analysts, and maintenance (compact, migrate, check)."""
