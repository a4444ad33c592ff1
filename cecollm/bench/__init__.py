"""Benchmarks of deployment strategies (the paper's evaluation): `cecollm bench`, baselines, fanout."""
