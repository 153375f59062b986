"""Real test servers and clients (Python, Go, Node, nginx) for the probe tests and benchmarks."""
