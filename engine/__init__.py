"""The machinery both stages run on: configs (``config``), the training-run skeleton
(``run``), atomic checkpoints (``checkpoints``), what the processes agree on (``distributed``),
data and its manifests (``data``, ``manifest``), FID's Inception (``fid``) and pretrained
weights files (``weights``). It knows nothing of either stage."""
