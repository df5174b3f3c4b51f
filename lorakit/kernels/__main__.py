"""python -m lorakit.kernels: which implementation of each operation runs on this machine, and why."""

import lorakit.kernels  # noqa: F401  (registers every operation)
from lorakit.kernels.report import report_lines

print("\n".join(report_lines()))
