"""The IR and the tools every pass shares: ``CapturedGraph`` and its typed node facts (ir), the op
table (ops), index flow (flow), graph queries and edits, MAC formulas and the reference counter."""
