"""Runners: one module per command that drives the engine (the layer between ``engine`` and ``cli``).

``compare`` (methods x seeds, summary; ``results``: statistics and committed records), ``demo`` (teacher run,
then compare), ``report`` (gradient share per loss term), ``export`` (student-only files, verified),
``predict`` (masks and overlays), ``plots`` (curves of a run), ``oneline`` (the config of a no-config-file
``train`` / ``distill``), ``cache_teacher`` (``c2vkd cache-teacher``: runs the teacher once per augmentation
view). Nothing is imported here: each command imports only its own runner.
"""
