"""The parts of `fvcompile.generate` (fvcompile/generate.py): the compiled steps of cached decoding,
prompts as batches, sampling, prompt-lookup drafts, and the decode-time profile."""
