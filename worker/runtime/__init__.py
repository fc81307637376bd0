"""The Celery edge and the process around the steps.

Settings-derived Celery configuration, logging, tasks, signals, leases and the sweep.
"""
