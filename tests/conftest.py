"""Suite-wide settings. Under CI (CI=true) Hypothesis draws the same examples every run, so a
submission's result does not depend on luck; locally it explores new ones each time."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
