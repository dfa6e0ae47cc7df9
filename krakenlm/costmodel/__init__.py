"""Analytical inference cost model: hardware specs, collectives, layouts, pipelines, estimator, planner,
and the serving simulator.

The main entry points are re-exported here; plots (matplotlib) are imported from
``krakenlm.costmodel.plots`` only when wanted.
"""

from krakenlm.costmodel.calibrate import Calibration, calibrate, load_records
from krakenlm.costmodel.estimator import Estimate, Layout, PhaseEstimate, Workload, estimate, max_context
from krakenlm.costmodel.hardware import Hardware, hardware_names, load_hardware
from krakenlm.costmodel.pipeline import Pipeline
from krakenlm.costmodel.planner import Plan, plan
from krakenlm.costmodel.simulate import CostModelTimes, Simulation, plan_slo, simulate

__all__ = [
    "Calibration", "CostModelTimes", "Estimate", "Hardware", "Layout", "PhaseEstimate", "Pipeline", "Plan",
    "Simulation", "Workload", "calibrate", "estimate", "hardware_names", "load_hardware", "load_records",
    "max_context", "plan", "plan_slo", "simulate",
]
