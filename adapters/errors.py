"""The adapters package's exception catalogue; each message names the value and the fix."""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every error raised by evertune.adapters."""


class BaseModelError(AdapterError, RuntimeError):
    """The base model cannot be found, converted or loaded."""


class TrainingError(AdapterError, RuntimeError):
    """A training run failed (the run is recorded as failed; the service goes on)."""


class Cancelled(AdapterError):
    """Work stopped on request (the daemon is stopping); nothing was published."""


class TrainingCancelled(Cancelled):
    """The stop flag was set between two training steps; nothing was published."""


class PreparationCancelled(Cancelled):
    """Preparing the base model (conversion, reference answers) was stopped on request."""


class NothingToTrain(AdapterError):
    """The domain has no example that no version was trained on yet."""


class VllmError(TrainingError):
    """A vLLM server failed a request (adapters/remote.py): in the training child it fails
    the run; the daemon's endpoint client (daemon/serving/vllm_api.py) reports it as its own."""


class VllmDown(VllmError):
    """The server did not answer (connection refused, reset or timed out)."""


class VllmRefused(VllmError):
    """The server answered with an error (the message carries its status and its reason)."""
