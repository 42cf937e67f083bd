"""llama.cpp's rules: its presets, its per-tensor type selection, and the clip (mmproj) rules."""
