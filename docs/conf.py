"""Sphinx configuration: the docs site, built in CI with warnings as errors (tox -e docs)."""

from __future__ import annotations

import os
import sys

# The API reference documents the checkout beside this directory (tox installs it too).
sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

project = "vmcontroller"
author = "the vmcontroller developers"
copyright = "2026, the vmcontroller developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "cli_reference"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 4
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# No network on the build machines: nothing that fetches inventories or images.
html_theme = "furo"
html_title = "vmcontroller"
