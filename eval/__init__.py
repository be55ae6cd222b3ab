"""Evaluator: stream shards through the model zoo and score per-sample predictions."""
