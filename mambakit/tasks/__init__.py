"""Synthetic tasks that show what selectivity buys (``mambakit tasks``): selective copying (and plain copying),
induction heads and multi-query associative recall (MQAR); the state-tracking tasks parity and modular arithmetic
(with and without brackets, `mambakit.tasks.state_tracking`); a training/evaluation runner and plots.

* :mod:`~mambakit.tasks.generators` -- seeded batch generators: ``(input_ids, targets)`` with -100 where no loss;
* :mod:`~mambakit.tasks.runner` -- :func:`run_task` (train from scratch, evaluate, plot) and :func:`run_sweep`.
The ``tasks`` subcommand itself is :mod:`mambakit.cli.tasks`.
"""
from mambakit.tasks.generators import (
    IGNORE,
    TASKS,
    induction_heads,
    make_batch,
    mqar,
    selective_copying,
    task_vocab_size,
)
from mambakit.tasks.runner import MIXERS, TASK_DEFAULTS, build_model_config, run_sweep, run_task
from mambakit.tasks.state_tracking import modular_arithmetic, parity

__all__ = ["IGNORE", "TASKS", "MIXERS", "TASK_DEFAULTS", "induction_heads", "make_batch", "modular_arithmetic", "mqar",
           "parity", "selective_copying",
           "task_vocab_size", "build_model_config", "run_sweep", "run_task"]
