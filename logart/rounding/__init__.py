"""rounding: see DESIGN.md."""
