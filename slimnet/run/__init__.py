"""The command-line run: ``python -m slimnet.train`` calls ``pipeline.train(cfg, run_dir)``.

* ``config``       -- checks of a composed config, before anything is built
* ``pipeline``     -- data, module, callbacks, fit, test, results.json, ``pruned.pt``
* ``detection``    -- the detection task's run (to be folded into ``pipeline``)
* ``sparse_cache`` -- one sparse phase shared by the jobs of a sweep
* ``sweep``        -- the sweep's CSV and accuracy-vs-FLOPs curve
* ``results``      -- results.json and the summary table
* ``console``, ``interrupt`` -- what the terminal shows; the ``resume=`` hint on Ctrl-C
"""
