"""``python -m transformer_patcher`` runs the command line."""

from transformer_patcher.cli import main_exit

main_exit()
