"""File formats, the bottom floor: GGUF reading and writing, split models, imatrix files, hashes and durable writes."""
