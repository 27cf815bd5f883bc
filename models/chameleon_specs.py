"""Registry entries of the chameleon family (to be written)."""
