"""Files: checkpoints (``checkpoint``), other weight files (``weights``) and
the one way anything here is written, atomically (``atomic``)."""
