"""evertune.store: the SQLite store (schema, migrations, queries) and ingestion of data files.

Imports neither `evertune.daemon` nor `evertune.adapters` (ARCHITECTURE.md, "Layering").
"""
