"""FP8 with fine-grained scaling: 1x128 / 128x128 quantization, block-scaled GEMMs, FP8 linear layers."""
