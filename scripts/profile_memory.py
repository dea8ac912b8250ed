"""Entry point: `python scripts/profile_memory.py --help` (pkm_lm.perf.commands.profile_main)."""

from pkm_lm.perf.commands import profile_main

if __name__ == "__main__":
    profile_main()
