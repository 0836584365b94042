"""GUI-free parts of the SSSTrain module: scene cases and their export, the training command,
the detached training process and its monitor, and the test scenarios.

Python 3.9 compatible (the module must load on Slicer 5.6/5.8 to say it needs 5.10);
``sss_lib`` (Python 3.10+) is imported only inside functions.
"""
