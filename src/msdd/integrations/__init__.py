"""Bridges to other libraries, each an optional extra imported only on use (`msdd.integrations.diffusers`)."""
