"""One module per table: each table's SQL beside its typed row (DESIGN.md, read model)."""
