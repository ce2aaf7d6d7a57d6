"""What the three packages share that is not about shards.

- ``atomic``: output written to a temporary name and renamed into place; figures;
- ``cli_errors`` and ``params``: what the three command lines share (one-line
  errors and ``--debug``; validated argument types; settings from options);
- ``tables``: small CSV tables written atomically, and their cells;
- ``scores``: confusion counts and voxel Dice/precision/recall, the one formula
  of the training curve, stream scores and whole-volume metrics;
- ``views``: a stored batch dequantised, and the views the models take of it.
"""
