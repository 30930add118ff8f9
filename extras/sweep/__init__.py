"""Hyperparameter search with Optuna on the W&B sweep YAML, offline, resumable, on one machine or many.

    python -m extras.sweep configs/sweep/fashion_mnist.yaml --trials 20 [--workers 2] [--storage URL]
        [--study NAME] [--seed S] [any fit flags, e.g. --trainer.max_epochs 4]

``method`` grid / random / bayes -> Optuna's Grid / Random / TPE sampler; ``parameters`` -> distributions;
``early_terminate: hyperband`` -> Optuna's Hyperband pruner with one bracket (W&B's checks), fed the ``metric``
after every validation. Each trial is ``python -m project fit`` in a process and run folder of its own under
``runs/sweep/<study>/trial_<N>/``; the study is kept in ``runs/sweep/<study>/study.journal`` (or ``--storage``, a
database URL such as PostgreSQL's). Run the same command again, or on other machines sharing the storage, to
continue it. At the end, and on Ctrl-C: a table of the trials, ``trials.csv``, ``best.yaml`` (``python -m project
fit -c best.yaml`` re-runs the best trial) and plots, in ``runs/sweep/<study>/``.
"""
