"""``python -m unidistill.cli ...``, the form ``torchrun`` and ``accelerate launch`` start."""

import os

from unidistill.cli import main

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
