"""Training with gates: ``prune`` (one phase to a verified compact model), the run state and its
checkpoints, the data walk, batch forms, plain classification training and the report."""
