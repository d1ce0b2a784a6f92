"""Benchmarks behind ``kvtier bench``."""
