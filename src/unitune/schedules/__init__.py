"""Schedules: which objectives train at each step."""
