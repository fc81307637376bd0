"""What operators use: the console script, the doctor, metrics."""
