"""Adapters for systems users already run (Ray Data, ...); each imports its system lazily."""
