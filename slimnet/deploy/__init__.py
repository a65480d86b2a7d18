"""Deployment: what happens to a pruned model after training.

* ``export``  -- ONNX / TorchScript / pt2 files with a numerical check against PyTorch
  (``export_and_check``, ``export_artifact``, ``load_exported``, ``onnx_session``); the command line
  ``python -m slimnet.export`` is ``slimnet/export.py``
* ``latency`` -- interleaved (ABBA) latency of models per backend: eager, channels_last, compile,
  onnxruntime (``measure_latency``, ``compare_latency``, ``speedup_columns``)

Nothing here is imported by ``import slimnet``: onnx and onnxruntime load only when asked for.
"""
