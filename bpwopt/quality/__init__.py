"""Quality tools: KL divergence against the base model, texts, the testbed, calibrate, tune and plots."""
