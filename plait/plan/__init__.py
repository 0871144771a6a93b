"""``plait plan``: predict step time and memory per GPU for any layout on any cluster, and search.

The files follow one estimate through: hardware.py (GPUs, links, clusters) -> spec.py (the model
and the training job as the planner sees them) -> compute.py (compute time) -> memory.py (bytes per GPU)
-> offload.py (host copies and the host optimizer step of the [memory] options) -> comm.py
(collective times on the links the groups cross) -> estimate.py (the step) ->
search.py (enumerate, prune, rank) -> report.py (table, JSON, with the uncertainty band
validation.py derives from runs the constants were never fitted to: published GPU runs, and
plait's own CPU steps in local_runs.py). calibrate.py measures this
machine; hetero.py places stages on clusters with mixed NICs; job.py reads a ``plait train``
job (and predicts its ranks' memory, ``predicted_memory``); auto.py serves
``parallel.layout = "auto"``; command.py is the ``plait plan`` command line. The candidate layout,
its rules and the pipeline schedules table (bubble, micro-batches in flight) are plait/layout.py:
the planner ranks only layouts ``plait train`` accepts.
"""
