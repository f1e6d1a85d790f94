"""Training: stream shards, apply Φ to the loss, save Hugging Face checkpoints. Imports scoring's contract only."""
