"""Puts tests/ on sys.path so that every test folder can `from helpers import ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
