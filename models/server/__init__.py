"""serve.py's package: an HTTP API over the served teacher/student pair (generate, attribute, training images), the
stages as jobs with streamed progress, and the steering page."""
