# Quick start:  make demo   (set up, then chat with SmolLM2 and print measurements)
#               make test   (set up, then run the whole test suite)
PY := .venv/bin/python

.PHONY: setup demo test bench exercises book clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m reference_engine demo

# Two passes: the tests whose pass or fail is a speed decision run alone, then the rest on
# two workers (`pytest` with no options runs everything in one process).
test: setup
	$(PY) -m pytest -m serial
	$(PY) -m pytest -m "not serial" -n 2 --dist loadgroup

bench: setup
	$(PY) -m reference_engine bench

# Regenerate exercises/ from solutions/ with nbgrader (a test fails when they differ).
exercises: setup
	$(PY) -m reference_engine make-exercises

# The book: static HTML from the lessons (executed) and the question banks.
book: setup
	$(PY) book/build.py
	@echo "open book/_build/index.html"

clean:
	rm -rf .venv .pytest_cache
