"""Layer files on disk: the B+tree index, blob framing and compression, delta and image layers, the
in-memory layer that becomes a delta layer, and layer names. Knows keys and values, nothing of timelines."""
