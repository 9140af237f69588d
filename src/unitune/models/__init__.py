"""Models: where they come from, loading, LoRA, saving, fingerprints, per-sequence log-probs."""
