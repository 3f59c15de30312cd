"""The face stages' glue (``stageio``); the face toolkit itself is ``portrait.faces``."""
