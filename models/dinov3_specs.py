"""Registry entries of the dinov3 family (to be written)."""
