"""Fault detection and recovery, C4-style: every rank beats and reports its progress and the
collective it is in; a monitor in the launching process classifies crashes, hangs, slow ranks
and non-finite values, names the culprit rank, stops every rank and restarts from the last
good checkpoint."""
