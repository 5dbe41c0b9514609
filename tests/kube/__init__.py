"""A real Kubernetes control plane and a process-running node agent for tests.

See ``tests/kube/plugin.py`` for the fixtures and
``docs/k8s-test-control-plane.md`` for how it works.
"""
