"""The pageserver: WAL in, layers and images out, pages and data directories served.

Grouped the way Neon's pageserver is, each layer importing only the ones below it (enforced by the
import contracts in pyproject.toml):

    service.py                 the daemon's HTTP API
    timeline/                  timelines, layer manager and map, ingest, WAL receiver, GC
    images/ | remote/          images (redo worker, restore, GetPage) | remote storage (upload, download)
    storage_layer/             layer files: B+tree, blobs, delta, image and in-memory layers
    key, value, config, ...    the shared vocabulary at the root
"""
