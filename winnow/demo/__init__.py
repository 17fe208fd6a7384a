"""``winnow demo``: the whole loop on one machine, ending with honest figures.

An embedded broker; the scorer (``winnow serve``'s app, HTTP API included);
the trainer (``winnow train``); a camera replaying a dataset's training split
as PNG frames (scikit-learn's digits by default, or any MedMNIST-layout
``.npz``); and a simulated labeling team answering from the dataset's labels
after a delay and at a limited rate. Each model the scorer swaps in is scored
on the test split; the run ends with labels used, initial and final accuracy,
the accuracy of the same model trained on every training label, and a plot.
"""

from winnow.demo.runner import run_demo

__all__ = ["run_demo"]
