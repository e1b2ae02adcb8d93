"""SAE training speed and quality, ours vs a plain dense TopK reference: see sae/bench.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
