"""fvcompile: a compiler-centric torch.compile toolkit."""
