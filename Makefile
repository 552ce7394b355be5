# Quick start:  make demo   (set up, then chat with SmolLM2 and print measurements)
#               make test   (set up, then run the whole test suite)
PY := .venv/bin/python

.PHONY: setup browser demo test bench exercises book clean

setup:
	@bash scripts/setup.sh

# Only the tests need a browser (the book's test opens its pages in chromium).
browser:
	@bash scripts/browser.sh

demo: setup
	$(PY) -m reference_engine demo

# Two passes: the tests that time things (speed decisions, the lessons) run alone, then the
# rest on two workers with one thread each, so that the two never fight over the 2 cores
# (`pytest` with no options runs everything in one process).
test: setup browser
	$(PY) -m pytest -m serial
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not serial" -n 2

bench: setup
	$(PY) -m reference_engine bench

# Regenerate exercises/ from solutions/ with nbgrader (a test fails when they differ).
exercises: setup
	$(PY) -m reference_engine make-exercises

# The book (Sphinx + MyST-NB) from the lessons and the question banks. Lessons execute
# through a cache: a second build with no code changed executes nothing.
book: setup
	$(PY) -m reference_engine book

clean:
	rm -rf .venv .pytest_cache
