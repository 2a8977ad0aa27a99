"""``python -m bombkd ...`` runs ``bombkd ...``."""
from bombkd_train.cli.main import main

main()
