"""Evaluation: held-out metrics, generation, win rate, retention, chat."""
