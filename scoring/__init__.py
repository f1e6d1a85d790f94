"""Scoring: the shard contract, the Φ library and the scoring backends. Never imports `training`."""
