"""GUI-free parts of the SSSTrain module: the dataset check and the training process runner.

Python 3.9 compatible; ``sss_lib`` (Python 3.10+) is imported only inside functions.
"""
