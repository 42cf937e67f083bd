"""The source model: an opened input GGUF, the rows of its tensors, and its summary for `inspect`."""
