import sys
from pathlib import Path

# The benchmarks package lives at the repository root (it is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
