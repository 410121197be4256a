"""The machinery both stages run on: configs (``config``), the training-run skeleton (``run``, its
shared ``train`` keys in ``run_config``) and around it the accelerator set-up (``accelerator``),
the training loaders (``loader``), atomic checkpoints and exports (``checkpoints``), the
scripts' command line and one-line errors (``cli``), what the processes agree on
(``distributed``), one run per output folder (``lock``), the data package (``data``: sources,
readers, manifests, streams, datasets), FID's Inception (``fid``), pretrained weights files
(``weights``) and counted device waits (``waits``). It knows nothing of either stage."""
