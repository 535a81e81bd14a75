"""Events from outside: ``POST <prefix>/<event name>/`` turns authenticated HTTP calls into events.

See ``django_events.urls`` and docs/inbound.md.
"""
