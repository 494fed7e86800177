"""The networks: encoder, decoder and shared layers (MMDiT, RoPE), the SSDD U-Net, discriminators, perceptual and
REPA feature networks, the PCA linear path, and the optimised inference path (CPU kernels, fused blocks, caches,
precision)."""
