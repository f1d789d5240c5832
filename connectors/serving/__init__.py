"""vLLM's admin API, publishing, the adapter registry and its files."""
