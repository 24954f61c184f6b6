"""Latency (optional pass, ``PruneConfig(cost="latency")``): a cost model in seconds on this machine.

Calibrated by timing the compact building blocks of each site at the deploy batch
(:mod:`.tables`), fitted as piecewise-linear sympy expressions in the same gate symbols as the
MAC model, and cached per machine and graph (:mod:`.timing`); :mod:`.build` assembles it.
"""

from hiap_fx.passes.latency.build import build_latency_model, deploy_inputs

__all__ = ["build_latency_model", "deploy_inputs"]
