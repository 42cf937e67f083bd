"""Jobs: the llama-quantize preset job, the optimize job, and the report they print."""
