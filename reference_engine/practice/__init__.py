"""Interview practice: spaced review of the question banks (FSRS), estimates with fresh
numbers, timed coding drills graded by the trusted grader, mock interviews and stats.

Files, one idea each: `catalog.py` (published model and GPU figures the estimates draw
from), `estimates.py` (templates, number parsing, named mistakes), `render.py` (answers
in a terminal), `scheduler.py` (FSRS behind our own small interface), `store.py` (the
SQLite state), `deck.py` (filters and the queue of due cards), `drills.py` (stub files and grading), `classifier.py` (the two drills built
on SmolLM2's hidden states), `session.py` (the interactive loops), `mock.py` and
`stats.py`. The CLI (`python -m reference_engine practice ...`) lives in
`commands/practice.py`.
"""
