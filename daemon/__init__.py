"""evertune.daemon: the service (config, CLI, watcher, store writer, lifecycle).

Nothing imports this package except its own CLI (ARCHITECTURE.md, "Layering").
"""
