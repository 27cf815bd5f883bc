"""Registry entries of the dino_world family (to be written)."""
