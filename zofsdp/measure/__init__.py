"""Measuring tools, apart from the trainer: `zofsdp bench` (bench, dist, convergence) and `zofsdp memory`
(memory, tracker, simulate). Shared helpers live in `common`; nothing here is imported by training code."""
