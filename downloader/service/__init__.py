"""The job service (``download service``): an HTTP API over durable download jobs.

``app`` builds the web application, ``store`` keeps jobs in SQLite, ``runner`` runs each
job in a child process (``job``) and ``feed`` follows it through its manifest; ``client``
is ``download submit``.
"""
