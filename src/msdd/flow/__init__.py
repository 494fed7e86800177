"""The multi-scale flow: stage windows (schedule), training path (path), sampler; SSDD's single-scale flow (ssdd)."""
