"""Stages composed end to end, the jobs' library entry points: the Ray Data encode job
(``encode``), a split's mined training folder (``mine``), query splits (``split``), the demo."""
