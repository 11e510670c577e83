"""The pipeline's stages, one per top-level script: generate pairs, extract reference features, attribute, the
whole pipeline, and the hook gallery."""
