"""Analytical inference cost model: hardware specs, collectives, layouts, estimator, planner."""
