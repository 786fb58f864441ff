"""Tools around the library, not part of it: the benchmarks (bench.py: the student side; bench_gpu.py: one GPU;
bench_teacher.py: the teacher side) and fault_server.py, an OpenAI-compatible server that injects faults (the test
double of rmd's teacher tests and the yield benchmark). No library module imports them. Run them from the repository
root: `python -m tools.bench`, `python -m tools.bench_gpu`, `python -m tools.bench_teacher`.
"""
