"""Video input: decoding (``video``), datasets and manifests (``datasets``),
synthetic clips the tests learn from (``synthetic``) and the decoder's
motion vectors (``motion``)."""
