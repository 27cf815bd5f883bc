"""Registry entries of the deit family (to be written)."""
