"""Evaluation: answers to a prompt set judged against a baseline, win-rate statistics,
and IFEval-format instruction-following scores."""
