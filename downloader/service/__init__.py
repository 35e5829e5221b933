"""The job service (``download service``): an HTTP API over durable download jobs.

``app`` builds the web application from the handlers of ``api``, ``streams`` (Server-Sent
Events) and ``pages``, which share ``keys`` (the app's typed keys) and ``views`` (the job
as JSON, errors); ``store`` keeps jobs in SQLite, ``runner`` runs each job in a child
process (``job``) and ``feed`` follows it through its manifest; ``client`` is
``download submit``.
"""
