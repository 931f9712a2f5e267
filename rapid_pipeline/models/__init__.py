"""Model architectures: CKCLIP (knowledge-enhanced Chinese CLIP) and its character tokenizer."""
