"""Sphinx configuration of the course's site. docs/build.py copies this file into the source folder it assembles
(README as the index, the executed notebooks, figures/REPORT.md, the API reference) and runs sphinx-build there.

Everything a page loads is served from the site itself: MathJax and the Jupyter widget manager are copied into
_static by docs/build.py, so that the pages work offline and the browser check can forbid requests to other hosts.
"""

project = "dsv3lab"
author = "dsv3lab"
copyright = "dsv3lab authors"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.mathjax"]
# .rst first: autosummary writes its generated pages with the first suffix, and they are reStructuredText.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "jupyter_execute"]

# Notebooks arrive executed (docs/notebooks.py): rendered as they are, never executed again here.
nb_execution_mode = "off"
nb_merge_streams = True
# The widget manager that renders saved widget state, from _static instead of a CDN (standalone bundle, no require.js).
nb_ipywidgets_js = {"widgets/embed.js": {}}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3  # the README's links to its own sections (#fp8)
mathjax_path = "mathjax/tex-chtml.js"  # relative to _static

autosummary_generate = True
autosummary_mock_imports = ["dsv3lab.__main__"]  # importing it runs the command line
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"

html_theme = "furo"
html_title = "dsv3lab — DeepSeek-V3, step by step"
html_static_path = ["_static"]
# after MathJax 3 (deferred, priority 500): the widget manager's MathJax 2 calls, forwarded to MathJax 3
html_js_files = [("mathjax2-shim.js", {"defer": "defer", "priority": 600})]
html_show_sourcelink = False
html_copy_source = False


def _bars_are_not_substitutions(app, what, name, obj, options, lines):
    """The library's docstrings write |x| for an absolute value, which reStructuredText reads as a substitution:
    escape the bars outside ``literals``."""
    for i, line in enumerate(lines):
        parts = line.split("``")  # even parts are outside literals
        lines[i] = "``".join(p.replace("|", "\\|") if k % 2 == 0 else p for k, p in enumerate(parts))


def setup(app):
    app.connect("autodoc-process-docstring", _bars_are_not_substitutions)
