"""What runs in or for the Gunicorn master: the worker class, connection
balancing between workers, and model rollouts (trial, pin, record)."""
