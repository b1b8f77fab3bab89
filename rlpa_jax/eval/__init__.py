"""Evaluation: policies under test, the ALOE protocol and its settings, AL metrics and plots."""
