"""The gated model: gates and per-site bundles, what a decision keeps, the compiled cost model,
the objective and budget controller, landing on the budget, and ``PreparedModel``."""
