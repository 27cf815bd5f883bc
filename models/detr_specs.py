"""Registry entries of the detr family (to be written)."""
