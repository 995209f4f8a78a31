"""Scoring and reports: metrics with trec_eval semantics, evaluation runs, the matrix and its report."""
