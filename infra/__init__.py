"""What every role stands on: Kafka plumbing, long-lived components, the error base.

``service`` (online) and ``trainer`` (learning) both import this package and
``schemas``; neither imports the other, and nothing here imports either.
"""
