"""Thin HTTP layer: task routes generated from the task table, plus health, readiness, metrics, models."""
