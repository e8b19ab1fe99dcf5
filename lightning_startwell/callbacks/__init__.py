"""The Lightning callbacks: each one decides when and on what the pure core runs, and logs under ``startwell/...``."""

from lightning_startwell.callbacks.init_scheme import InitScheme
from lightning_startwell.callbacks.signal_propagation import SignalPropagationMonitor

__all__ = ["InitScheme", "SignalPropagationMonitor"]
