"""The compiler's passes over the shared IR (``hiap_fx.graph.ir.CapturedGraph``); their order is
listed in one place, :mod:`hiap_fx.passes.pipeline`."""
