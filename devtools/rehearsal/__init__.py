"""The scale and fault rehearsal (``python -m devtools.rehearsal``, ``make rehearsal``); see __main__."""
