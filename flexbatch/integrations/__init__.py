"""Adapters to systems users already run (lm-evaluation-harness, Ray Data), each an optional
extra imported only when used: `import flexbatch.integrations.lm_eval`, `...integrations.ray`."""
