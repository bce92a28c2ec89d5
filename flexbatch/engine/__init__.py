"""Execution: the only package that knows both model compute and where tensors live."""
