"""io: see DESIGN.md."""
