"""The course's web pages: executing the notebooks (``notebooks``) and building the static site (``build``).

Not part of the library: the library never imports it, and it may use the ``docs`` extra's tools (Sphinx, myst-nb).
"""
