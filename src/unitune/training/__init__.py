"""Training: batches, references, the policy, the loop, its state, checkpoints and run directory."""
