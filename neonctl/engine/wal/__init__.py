"""engine/wal."""
