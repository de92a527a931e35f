"""Evaluation: lm-evaluation-harness on training outputs, offline from local files; tables and figures."""
