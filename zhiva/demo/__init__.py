"""A demo model that works out of the box: a synthetic chest CT and lung measurements."""
