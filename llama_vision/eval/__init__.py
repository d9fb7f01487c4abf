"""Evaluation harness: tasks, readers, metrics, runner."""
