"""The console commands, one module each: ``score`` (``nearid-score``, also ``torchrun -m nearid_metric.cli``),
``download`` (``nearid-score download``), ``bench`` (``nearid-bench``), ``dreambench`` (``nearid-dreambench``) and
``train`` (``nearid-train``), sharing :mod:`nearid_metric.cli.common`.

A command parses and validates its arguments, calls the library and prints; nothing in the library imports it.
"""
