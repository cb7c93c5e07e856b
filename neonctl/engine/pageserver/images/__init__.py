"""Images: full copies of a database at an LSN, made by the redo worker (Postgres replaying WAL), stored as
image layers, restored and materialised into data directories, and read page by page (GetPage)."""
