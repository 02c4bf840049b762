"""evertune.adapters: the model side (base-model preparation, training, evaluation, registry).

Imports `evertune.store` (version rows and their states, error types, two helpers), never
`evertune.daemon` (ARCHITECTURE.md, "Layering").
"""
