"""The inbox: dropped files watched (watcher), handed over as they settle (ingestion) and
ingested one at a time on the store writer's thread (writer)."""
