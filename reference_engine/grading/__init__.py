"""The trusted grader: checks for learners' code, run three ways (CLI, pytest, notebook cells)."""
