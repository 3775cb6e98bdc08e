"""Benchmarks the installed ``ota`` runs (``ota bench ...``); their results and write-ups
live in the repository's ``bench/`` directory."""
