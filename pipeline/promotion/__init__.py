"""Whether a candidate may serve: the gate's checks, adapter comparisons and loop metrics."""
