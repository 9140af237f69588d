"""Schedules: which objectives train at each step. Each schedule is one module, registered on
import (`registry.register_schedule`)."""

from unitune.schedules import alright, maxright, mix, pref_only, sequential, sft_only  # noqa: F401
