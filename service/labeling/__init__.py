"""The labeling team's side: the web app (``winnow label-app``) and the Label Studio bridge.

Both read ``winnow.label-requests`` in their own consumer group and publish
answers to ``winnow.labels``; offsets are committed only for frames whose
label (or import) Kafka or Label Studio acknowledged.
"""
