"""The weight channel: ``WeightPublisher``, ``WeightSubscriber``, their control notes, shared
memory, versions, install and reports."""
