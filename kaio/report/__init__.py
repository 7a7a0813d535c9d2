"""The permanent record of a run for people: ``history.json``, ``report.md``, ``telemetry.png``.

Nothing is imported here: the process that draws telemetry.png imports
``kaio.report.plot``, and would otherwise pay for the whole report (pydantic
through the markdown's config) on every drawing.
"""
