"""proctor engine: the iteration loop, with no UI inside."""
