"""Seeing the answer: a user's own examples beside their scores, reports, and HTML reprs.

- :func:`show` (``to.show``): the examples behind a top-k, self-influence or net-influence result, drawn
  by what they are (pictures, decoded text, table rows, or a ``render`` function), with labels and
  scores; renders in Jupyter and saves as .html or .png.
- :func:`report` (``to.report``, ``trackin-ooc report``): one self-contained HTML file for a train and a
  test store.
- :func:`token_gradient_mass`: per-token gradient mass at the embedding, for ``show(token_weights=)``.
- :func:`plan_table_html`: a projection spec's per-layer plan as an HTML table; ``GradientStore`` and
  ``TopKIndex`` render as tables in Jupyter through :mod:`.reprs`.

Nothing here imports torch except :func:`token_gradient_mass`, when called; scores come from the public API.
"""

from .examples import Renderer, ViewError, kind_of
from .html_report import report
from .influence_view import InfluenceView, show
from .reprs import plan_table_html
from .saliency import token_gradient_mass

__all__ = [
    "show",
    "report",
    "InfluenceView",
    "ViewError",
    "Renderer",
    "kind_of",
    "plan_table_html",
    "token_gradient_mass",
]
