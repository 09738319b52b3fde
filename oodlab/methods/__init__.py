"""OOD methods: one module per paper. A method never imports Ray, Optuna or MLflow.

A method module provides ``Config`` (a ``oodlab.experiment.TrialConfig`` subclass) and
``Experiment`` (an ``oodlab.experiment.Experiment[Config]`` subclass); ``oodlab.registry``
names them by the config's ``method`` key. This package imports nothing itself, so
importing one method does not import the others.
"""
