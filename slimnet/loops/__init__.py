"""Training-loop adapters: each translates its loop's events into ``slimnet.core`` calls.

* ``lightning``   -- ``SparsityCallback``, ``SlimmingCallback``, the monitors, checkpoint support
* ``mmengine``    -- ``SlimnetSparsityHook``, ``SlimnetSlimmingHook`` (in mmengine's ``HOOKS``), ``load_checkpoint``
* ``ultralytics`` -- ``slim_train``, ``SparsityCallbacks``, ``SlimmingCallbacks``, ``keep_cut_widths``, ``recut``
  (ultralytics is AGPL-3.0: imported only there, never by ``import slimnet``)
"""
