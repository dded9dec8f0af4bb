"""The study pipeline: fine-tune grids, their seed ensembles, experiment stages and the experiment report.

* :mod:`.grid`: ``inits x regimes x label budgets x seeds`` of ``finetune/run.py`` runs, the cells still to
  do, launching them, the comparison report (``scripts/compare.py`` is its command line);
* :mod:`.ensembles`: the seeds' test probabilities averaged and scored like one run;
* :mod:`.stages`: training, sampling, audit and grid stages: config validation, hashing, reuse, resume;
* :mod:`.experiment`: the experiment schema (one section per registered training stage) and
  :func:`~.experiment.run_experiment` (``scripts/run_experiment.py`` is its command line);
* :mod:`.report`: ``report.md`` + ``experiment.json`` of an experiment.

Nothing here prints: progress goes to the ``console`` stream the entry script passes (:mod:`.console`).
"""
