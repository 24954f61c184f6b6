"""Files are data: atomic writes, and reading files without executing or unpickling code.

* :mod:`.atomic` writes every file through a temporary file, ``fsync`` and ``os.replace``;
* :mod:`.allowlist` resolves the call targets and module classes a stored graph names against
  an allow-list (torch ops, ``operator``, ``math``, the classes and functions hiap_fx's
  registries vouch for); anything else needs the caller's explicit ``trust=True``;
* :mod:`.graph_data` turns an ``fx.GraphModule`` into a structured node list plus tensors and
  back, without generating or executing stored source code;
* :mod:`.reading` opens a file with ``torch.load(weights_only=True)`` and turns every failure
  (missing, empty, truncated, foreign, pickled objects) into a :class:`hiap_fx.FileError`.
"""
