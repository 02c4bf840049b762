"""evertune.daemon: the service. service.py wires the parts; config, the CLI and status sit
here, and a dropped file's stages each have a folder: inbox/, training/, serving/, control/
(ARCHITECTURE.md, "Layering").

Nothing imports this package except its own CLI (ARCHITECTURE.md, "Layering").
"""
