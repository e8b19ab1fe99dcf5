"""The Lightning callbacks: each one decides when and on what the pure core runs, and logs under ``startwell/...``."""

from lightning_startwell.callbacks.critical_period import CriticalPeriodMonitor, find_critical_period_monitor
from lightning_startwell.callbacks.deficit_injector import DeficitInjector
from lightning_startwell.callbacks.dropout_schedule import DropoutSchedule
from lightning_startwell.callbacks.fisher_monitor import FisherTraceMonitor
from lightning_startwell.callbacks.gradient_dynamics import GradientDynamicsMonitor
from lightning_startwell.callbacks.init_scheme import InitScheme
from lightning_startwell.callbacks.signal_propagation import SignalPropagationMonitor
from lightning_startwell.callbacks.stochastic_depth import StochasticDepthSchedule
from lightning_startwell.callbacks.weight_decay import WeightDecaySchedule

__all__ = [
    "CriticalPeriodMonitor",
    "DeficitInjector",
    "DropoutSchedule",
    "FisherTraceMonitor",
    "GradientDynamicsMonitor",
    "InitScheme",
    "SignalPropagationMonitor",
    "StochasticDepthSchedule",
    "WeightDecaySchedule",
    "find_critical_period_monitor",
]
