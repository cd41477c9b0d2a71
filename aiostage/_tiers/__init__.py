"""Tiered checkpoints: which saves reach which tier (policy), the node-local tier (local), the
copies kept in memory (memory), the restore that agrees on a step every rank can reach (roll,
plan, fetch) and what it reports (report); ``tiers`` composes them for the Checkpointer."""
