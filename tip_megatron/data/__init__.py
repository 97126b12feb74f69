"""Prompt data: sources (JSONL/parquet), the prompt sampler, tokenizers."""
