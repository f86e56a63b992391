"""The scan job: listing an archive, planning a run incrementally, the Ray Data pipeline, and the job itself."""
