"""One module per chapter; each registers its graded tasks."""
