"""Entry point: `python scripts/bench_train.py --help` (pkm_lm.perf.train_speed): training and
inference speed of L layers, L layers + 1 memory and 2L layers side by side."""

from pkm_lm.perf.train_speed import main

if __name__ == "__main__":
    main()
