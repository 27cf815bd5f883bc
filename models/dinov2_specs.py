"""Registry entries of the dinov2 family (to be written)."""
