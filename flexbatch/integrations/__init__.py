"""Adapters to other frameworks (lm-evaluation-harness), each an optional extra imported only
when used: `import flexbatch.integrations.lm_eval`."""
