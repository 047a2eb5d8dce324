"""Benchmarks of greenmim against the all-token (SimMIM-style) baseline.

* :mod:`.step`: full pretraining steps of both methods, timed interleaved in one process;
* :mod:`.memory`: per-method peak memory (CUDA allocator peak, or profiler allocation events on CPU);
* :mod:`.flops`: FLOPs of one forward + backward;
* :mod:`.profile`: top operators of profiled steps (where the time goes);
* :mod:`.compare`: one comparison and sweeps over mask ratio and image size;
* :mod:`.solver`: host cost of the grouping solver alone;
* :mod:`.calibrate`: fit of the solver's cost model to measured group-attention times;
* :mod:`.report`: tables, JSON and plots.

The command line is ``greenmim-bench`` (:mod:`greenmim.cli.bench`).
"""
from .calibrate import calibrate_cost_model
from .compare import BenchConfig, run_comparison, run_sweep
from .flops import count_step_flops
from .memory import MemoryStats, measure_step_memory
from .profile import profile_steps
from .solver import solver_benchmark
from .step import PlannedBatches, TrainStep, build_models, time_interleaved

__all__ = [
    "BenchConfig", "run_comparison", "run_sweep", "solver_benchmark", "calibrate_cost_model",
    "TrainStep", "PlannedBatches", "build_models", "time_interleaved", "measure_step_memory", "MemoryStats",
    "count_step_flops", "profile_steps",
]
