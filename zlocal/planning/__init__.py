"""Hardware reports, memory estimates and load plans."""
