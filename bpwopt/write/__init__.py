"""The write stage: quantized GGUF files from an input model and one type per tensor."""
