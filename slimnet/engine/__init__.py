"""The plain-PyTorch engine: decide, cut, measure and save, with no training framework imported.

Read in this order:

* ``plan``        -- |γ| and a policy (thresh | percent, ties broken by β) -> kept channels per group
* ``budget``      -- the threshold that meets a FLOPs budget (``target_flops``)
* ``valley``      -- ``thresh="auto"``: each layer cut at the valley of its own |γ|
* ``latency_table``  -- per-layer latency against width, measured once per model/input/device, cached
* ``latency_budget`` -- ``target_latency``: the knapsack over that table, widths rounded where latency jumps
* ``fold``        -- what removed channels still emit, moved into the biases that remain
* ``surgery``     -- slicing every parameter axis a plan names, all or nothing; replaying a plan
* ``cut``         -- ``prune`` and ``run_surgery``: trace, decide, fold, cut, report
* ``zeroed``      -- ``prune_zeroed``: zeroed filters or masks -> a smaller model
* ``reach``       -- what a cut can reach, known before training
* ``measure``     -- FLOPs and parameters
* ``report``      -- ``PruneReport``
* ``optim_state`` -- an optimizer's state carried over a cut (``carry_optimizer_state``, ``retarget_optimizer``)
* ``artifact``    -- ``save_pruned`` / ``load_pruned`` (weights + plan + model config, ``weights_only``)
* ``atomic``      -- files written whole or not at all
"""
