"""Quantized weights: GGML block formats decoded in torch, and the encoders that write them."""
