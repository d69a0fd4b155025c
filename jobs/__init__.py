"""Ray driver and tasks for manifest runs (``converter run``): the only package that imports ray."""
