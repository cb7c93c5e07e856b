"""A timeline's life in the pageserver: its layer manager and layer map, WAL ingest and the WAL receiver,
the catalog of layers across timelines, and garbage collection. Builds on images and storage layers."""
