"""``python -m transformer_patcher.cli`` (as ``accelerate launch -m transformer_patcher.cli`` runs it)."""

from transformer_patcher.cli import main_exit

if __name__ == "__main__":
    main_exit()
