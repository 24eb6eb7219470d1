"""Side-by-side benchmarks of request-scoped session patterns (issue 4).

``python -m benchmarks`` runs everything and writes ``benchmarks/RESULTS.md`` and
``benchmarks/ratios.png``; ``python -m benchmarks --quick`` is a short smoke run.
"""
