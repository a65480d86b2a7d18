"""Tasks: what a run trains (data, LightningModule, metric) and what of it is cut.

* ``classification`` -- ``SlimModule``: cross-entropy, a sparse and a fine-tune phase
* ``detection``      -- torchvision detectors: ``DetectionTask``, the trunk the cut traces, COCO mAP
"""
