"""Running on a Ray cluster: starting or joining Ray, and submitting jobs through the Jobs API."""
