"""From finished runs to the numbers people compare: Δm against single-task baselines."""
