"""Pairwise judging of the target model's answers to the original and the optimized prompt."""
