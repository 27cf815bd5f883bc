"""Registry entries of the htdemucs family (to be written)."""
