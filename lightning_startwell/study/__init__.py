"""Critical-period studies (Achille et al. 2017): a grid of runs, each one ``startwell fit`` of a plain config, run
resumably, spread over machines if need be, merged, and reported with figures and paired tests across seeds.

``python -m lightning_startwell.study run`` runs the ``quick`` profile; see :mod:`lightning_startwell.study.cli`.
"""

from lightning_startwell.study.config import Experiment, RunSpec, Study, cell_config, load_study, parse_study
from lightning_startwell.study.record import StudyRecord
from lightning_startwell.study.report import write_report
from lightning_startwell.study.results import merge, read_results
from lightning_startwell.study.runner import run_study, write_cells

__all__ = [
    "Experiment",
    "RunSpec",
    "Study",
    "StudyRecord",
    "cell_config",
    "load_study",
    "merge",
    "parse_study",
    "read_results",
    "run_study",
    "write_cells",
    "write_report",
]
