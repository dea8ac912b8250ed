"""`python -m pkm_lm.preprocess raw_dir=DIR out_dir=DIR`: raw text -> token shards (Hydra)."""

from __future__ import annotations

import logging

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pkm_lm import cli
from pkm_lm.data.pipeline import PreprocessConfig, preprocess

ConfigStore.instance().store(name="preprocess_schema", node=PreprocessConfig)
log = logging.getLogger(__name__)


@cli.hydra_main("preprocess")
def main(dcfg: DictConfig) -> None:
    cfg: PreprocessConfig = OmegaConf.to_object(dcfg)
    manifest = preprocess(cfg)
    for split, info in manifest["splits"].items():
        log.info(
            "%s: %d tokens in %d shard(s), %d lines, %d <unk>, %d bytes replaced",
            split,
            info["tokens"],
            len(info["shards"]),
            info["lines"],
            info["unk"],
            info["replaced_bytes"],
        )
    log.info("vocab size %d (%s) -> %s", manifest["vocab_size"], manifest["dtype"], cfg.out_dir)


if __name__ == "__main__":
    main()
