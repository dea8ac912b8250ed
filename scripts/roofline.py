"""Entry point: `python scripts/roofline.py --help` (pkm_lm.perf.commands.roofline_main)."""

from pkm_lm.perf.commands import roofline_main

if __name__ == "__main__":
    roofline_main()
