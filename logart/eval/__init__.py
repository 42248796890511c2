"""eval: see DESIGN.md."""
