"""engine/safekeeper."""
