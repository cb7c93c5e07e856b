"""The storage explorer's data: a project's storage metadata as rows, and DuckDB views over them.

`metadata.py` reads what the pageserver stores (layer indexes, timeline metadata, commit logs, WAL
segments) straight from the project's directory, read-only, and asks the running daemons only for
what is not on disk (relation names from a running compute, GC's dry run, daemon states); `views.py`
turns one such snapshot into the documented DuckDB views (`layers`, `timelines`, `relations`,
`commits`, `wal`, `gc`, ...) that `neonctl layers query` and the TUI both query. `keys.py` decodes
key bounds into relation/fork/block, `generated.py` makes big synthetic catalogs for benchmarks.
Nothing here imports Textual or typer.
"""
