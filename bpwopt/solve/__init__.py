"""Solving: objectives over the measurements, budgets from targets, the problem, and the exact knapsack."""
