"""engine/pageserver."""
