"""Auditor tools over a build's output folder: stats, report, explain, verify, redact, card.

Everything here reads only what a build leaves in OUTPUT (the manifests, the shards, build.json
and, when present, the work folder ``_work``), so an auditor needs nothing else. ``redact`` is the
one tool that writes: it rewrites the shards and manifests that held the removed items.
"""
