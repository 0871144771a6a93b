"""The training loop: the Trainer recipe (build, then step -> log -> validate -> checkpoint), the
optimizer and schedule, the loss, the pipeline runner, metrics, and the step guard that watches faults.
"""
