"""Serving: the embedded vLLM (vllm_process, vllm_entry, pausing), its endpoints kept equal to
the database (endpoints, vllm_api, wanted), a stable name bound to one version per request
(routing), canaries, and the daemon's serving side that starts it all (runner)."""
