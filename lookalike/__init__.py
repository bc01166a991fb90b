"""lookalike: the console script's home. The work lives in `embedder`, `training` and `service`."""
