"""Shadow scoring: a candidate version scored in the worker on the rows the
served version answered, after the answer is sent (comparison, scorer)."""
