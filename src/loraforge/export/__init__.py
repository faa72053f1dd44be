"""Exports: an adapter leaves loraforge in the formats other tools read, each checked before it is kept."""
