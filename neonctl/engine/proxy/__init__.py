"""The proxy: the one address clients use for every branch of a project (Neon's proxy, locally)."""
