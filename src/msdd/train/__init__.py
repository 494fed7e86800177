"""Stage-1 trainer, shared loop pieces, checkpoints."""
