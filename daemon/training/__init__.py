"""Training: when a domain trains (schedule), one run at a time (runqueue), what a queued run
does (work), the cycle from data to verdict (cycle: selection, the training child through
children, publishing), and forget."""
