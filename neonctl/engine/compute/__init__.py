"""engine/compute."""
