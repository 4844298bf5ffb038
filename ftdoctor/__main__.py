"""``python -m ftdoctor`` (and ``torchrun -m ftdoctor``) runs the command line."""
from ftdoctor.cli import main

if __name__ == "__main__":
    main()
