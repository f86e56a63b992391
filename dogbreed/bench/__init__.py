"""Benchmarks: `speed` (the classic loop vs. the scan vs. the stage bounds), `archive` (listing, planning, memory and
time to first result at 10k-1M files) and `memory` (peak RSS of the driver and the Ray workers below it)."""
