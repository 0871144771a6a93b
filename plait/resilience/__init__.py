"""Fault detection and recovery, C4-style: every rank beats and reports its progress and the
collective it is in; a monitor in the launching process classifies crashes, hangs, slow ranks
and non-finite values, names the culprit rank, stops every rank and restarts from the last
good checkpoint.

Here: the rank side (watchdog, fault injection, event log) and the monitor with the torchrun
agent; the local supervisor that restarts ranks lives with the launcher (plait/launch/).
"""
