"""Applying a layout to a plain model from outside: the mesh (dims), pipeline split, tensor, expert
and context parallelism, activation recompute, FSDP/HSDP/DDP and ZeRO-1. ``parallelize`` is the recipe.
"""
