"""Encoder, decoder and shared layers (MMDiT), perceptual network."""
