"""datakit: rebuild the HiFi-Portrait training corpus with Ray-parallel stages."""

__version__ = "0.1.0"
