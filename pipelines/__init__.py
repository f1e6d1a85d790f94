"""Pipelines: the `tokenprio` CLI and end-to-end jobs that wire scoring and training together."""
