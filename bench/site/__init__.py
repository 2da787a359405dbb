"""The leaderboard site: static HTML generated from the results store, viewable offline.

``certbench leaderboard site --store runs/certbench.sqlite --out DIR`` (or
:func:`build_site`) writes::

    DIR/index.html                    the boards: dataset x norm, test-set size, date
    DIR/<dataset>-<norm>.html         one board: sortable, filterable table, curves, intervals
    DIR/<dataset>-<norm>/<row>.html   one row: parameters, settings, provenance, curves, paper
    DIR/data/<dataset>-<norm>.csv     the boards' CSVs and results.csv (as ``publish``)
    DIR/static/site.css, site.js      shipped with the package; no CDN, no server

Links are relative and charts are inline SVG, so the site works from ``file://`` with no
network. Pages are rendered from Jinja2 templates in ``templates/``; the data behind them is
assembled in :mod:`bench.site.pages` and the charts drawn in :mod:`bench.site.charts`.
"""

from bench.site.build import build_site

__all__ = ["build_site"]
