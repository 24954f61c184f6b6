"""Applications on top of the library: the ``hiap-fx`` CLI, the demo, the coverage run, benchmarks
helpers, datasets, plots and run artifacts."""
