"""What a run measures about itself: every collective counted by mesh dimension (``collectives``),
slow-link emulation on top of them, and the pipeline timeline with its Gantt chart (``timeline``).
"""
