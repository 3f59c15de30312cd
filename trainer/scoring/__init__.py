"""The evaluation protocol's parts (``python -m trainer.evaluate``): the protocol file, the
scorers (face recognition, CLIP, head pose and expression), intervals and the outputs."""
