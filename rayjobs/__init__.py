"""Entrypoints (`python -m rayjobs.<name>`): prepare_data, train, evaluate, tune, leaderboard, benchmark, demo."""
