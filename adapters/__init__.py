"""evertune.adapters: the model side (base-model preparation, training, evaluation, registry).

Imports `evertune.store` only for the types it needs (DESIGN.md, dependency direction).
"""
