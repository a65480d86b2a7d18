"""Classification: ``SlimModule`` (``module``) and each phase's optimizer and schedule (``optimizers``)."""
