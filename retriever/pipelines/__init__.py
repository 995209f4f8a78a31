"""Stages composed end to end, the jobs' library entry points: the Ray Data encode job
(``encode``), query splits (``split``), a split's mined training folder (``mine``), the
evaluation matrix run cell by cell on the cluster (``evaluate``), and the demo."""
