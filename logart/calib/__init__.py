"""calib: see DESIGN.md."""
