"""Process, device and megatron plumbing every layer above builds on (no model code)."""
