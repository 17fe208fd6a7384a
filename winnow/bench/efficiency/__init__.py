"""The parts of ``winnow bench label-efficiency`` (the command: ``winnow.bench.label_efficiency``).

- :mod:`.stream`: the dataset as a stream (video bursts, imbalance), preprocessed once;
- :mod:`.pretrained`: frozen EfficientNet-Lite0 features for ``--pretrained``;
- :mod:`.specs`: the strategies, built in or given by name on the command line;
- :mod:`.learner`: the trainer's rounds and head refits, and the full-data reference;
- :mod:`.peers`: scikit-activeml's stream strategies;
- :mod:`.run`: one strategy and seed through the stream;
- :mod:`.curves`: smoothing, labels to target, geometric means and bootstrap intervals;
- :mod:`.report`: the JSON entries, the table and the plot.
"""
