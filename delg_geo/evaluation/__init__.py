"""Stage 4, evaluation: batch benchmarks in the MediaEval Placing format, the S2-cell classifier
and rootSIFT baselines, metrics, diagnosis of a run, and maps of results.

Takes an index and a query set with ground truth, gives ``predictions.csv``, ``summary.json``
and plots. Open ``bench.py`` first.
"""
