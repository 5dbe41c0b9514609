"""The demo that ``patio local`` runs: tasks (``patio.worker.demo.tasks:rpc``) and a workload.

It ships inside the package so ``patio local`` works from an installed wheel,
in any folder. docs/local.md describes what each task shows.
"""
