"""Training-loop adapters: each translates its loop's events into ``slimnet.core`` calls.

* ``lightning`` -- ``SparsityCallback``, ``SlimmingCallback``, the monitors, checkpoint support
"""
