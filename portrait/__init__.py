"""What datakit and the trainer must agree on, in one place both import (no Ray, no torch).

- ``ids``: the image id and the sample-key rule;
- ``sample``: the shard sample (members, JSON fields, encode, parse, validate);
- ``shardio``: deterministic tar writing and safe tar reading;
- ``decode``: image bytes to RGB pixels (limits, EXIF orientation, RGB conversion);
- ``faces``: the face toolkit (backends, settings, geometry, the per-photo reader that gives a
  photo's box, landmarks, aligned crop and embedding exactly as the build recorded them);
- ``landmarks``: the training crop, the landmark condition image, 2D retargeting.

Data flows one way: datakit and trainer import this package; it imports neither.
"""
