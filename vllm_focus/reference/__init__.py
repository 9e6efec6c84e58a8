"""Plain-PyTorch reference forward and decoder: the oracle the engine is tested against."""
