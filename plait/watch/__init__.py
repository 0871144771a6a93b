"""The live page of a run: ``plait watch RUN_DIR``, or ``plait train --metrics.serve PORT``.

It reads the run's files (reader.py) and serves them with the page's own assets (server.py);
the ranks never know it is there.
"""
