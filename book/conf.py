"""Sphinx configuration of the Inference Dojo book (`make book`).

The lessons (book/lessons links to ../lessons) are executed by MyST-NB through its cache:
a notebook runs again only when one of its code cells changed. The chapter pages, the
question banks, the math and the offline rules are the project's own extension, dojo_book.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

project = "Inference Dojo"
author = "the Inference Dojo authors"
copyright = "the Inference Dojo authors"
root_doc = "index"

extensions = ["myst_nb", "sphinx_copybutton", "sphinx_design", "dojo_book"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "questions"]

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Lessons run once and are cached (book/_build/.jupyter_cache); a failing lesson stops the
# build (dojo_book names the notebook and the cell), it never becomes a page without outputs.
nb_execution_mode = "cache"
nb_execution_cache_path = str(Path(__file__).resolve().parent / "_build" / ".jupyter_cache")
nb_execution_timeout = 600
nb_execution_in_temp = True
nb_execution_allow_errors = False
nb_execution_raise_on_error = False  # dojo_book raises, with the cell named
nb_ipywidgets_js = {}  # the lessons use no widgets, and these scripts would come from a CDN
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "Inference Dojo"
html_static_path = ["_static"]
html_js_files = ["dojo-selfcheck.js"]
html_math_renderer = "mathml"  # dojo_book: MathML at build time, nothing fetched when reading
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_last_updated_fmt = None
html_copy_source = False
