"""Entry points into the engine: the servers that front it."""
