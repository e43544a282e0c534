"""The asyncstreams benchmark suite: `python -m benchmarks` (see benchmarks/README.md).

A program, not a test: it prints the versions it runs with, runs each scenario for
asyncstreams, a hand-written redis-py baseline and FastStream on the same server and data,
verifies every run (each entry handled once, nothing pending, the group at the stream's end),
and writes JSON, a Markdown table and a chart under benchmarks/results/.
"""
