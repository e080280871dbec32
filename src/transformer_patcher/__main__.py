"""``python -m transformer_patcher`` runs the command line."""

from .cli import main_exit

main_exit()
