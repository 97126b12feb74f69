"""Pictures of a run: learning curves from metrics.jsonl, per-token scatter from token dumps."""
