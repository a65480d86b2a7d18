"""Training-loop adapters: each translates its loop's events into ``slimnet.core`` calls.

* ``lightning``   -- ``SparsityCallback``, ``SlimmingCallback``, the monitors, checkpoint support
* ``mmengine``    -- ``SlimnetSparsityHook``, ``SlimnetSlimmingHook`` (in mmengine's ``HOOKS``), ``load_checkpoint``
"""
