"""Benchmarks of django_events against hand-written wiring and a peer (``python -m benchmarks``).

Not tests: nothing here is timed in CI. ``--smoke`` runs each benchmark once with a tiny count.
"""
