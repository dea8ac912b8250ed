"""Reproducing the paper's tables: what ``scripts/sweep.sh`` needs besides running commands.

``runs`` reads a sweep's run directories, ``noise`` judges gaps against the seed noise, ``cells``
formats them, ``tables`` and ``claims`` lay out the report's tables, ``plots`` its figures,
``report`` writes a group's page; ``table`` is the command line of all that. ``compose`` builds
the experiments' configs as the sweep trains them, for ``params`` (the grid's sizes),
``estimate`` (a group's GPU wall time, a cost model) and ``dataset`` (the sweep's data dir).
"""
