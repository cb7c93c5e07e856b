"""neonctl: serverless PostgreSQL's storage/compute split, rebuilt as a local branching toolkit."""

__version__ = "0.1.0"
